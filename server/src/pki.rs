//! A small certificate authority for Weft's mutual TLS: one CA, a server
//! certificate, and client certificates whose subject says who the caller
//! is. The organisation (O) names the role — `weft-node`, `weft-admin`,
//! `weft-viewer` — and the common name (CN) the identity: a node's
//! certificate has CN = its node name. `weft-server certs` writes a set for
//! a cluster; tests issue their own.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("generating a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} exists: a CA is already there; `certs add` issues more from it, --force replaces it (its certificates stop being trusted)"
    )]
    CaExists(String),
    #[error("invalid name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("nothing to issue: name --node, --admin or --viewer")]
    NothingToIssue,
}

/// What a certificate lets its holder do (its subject's O).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Node,
    Admin,
    Viewer,
}

impl Role {
    pub fn organization(self) -> &'static str {
        match self {
            Role::Server => "weft-server",
            Role::Node => "weft-node",
            Role::Admin => "weft-admin",
            Role::Viewer => "weft-viewer",
        }
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster's certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    pub fn generate(name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = date_time_ymd(2025, 1, 1);
        params.not_after = date_time_ymd(2035, 1, 1);
        let key = KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// Issues a certificate for `name` in `role`; `sans` are the DNS names
    /// or IP addresses a server certificate answers to. `valid` overrides
    /// the validity (tests issue expired ones).
    pub fn issue(
        &self,
        role: Role,
        name: &str,
        sans: &[String],
        valid: Option<(i32, i32)>,
    ) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(sans.to_vec())?;
        // Names the CA's key: a verifier (and the test) can tell which CA
        // issued it when several are around.
        params.use_authority_key_identifier_extension = true;
        params
            .distinguished_name
            .push(DnType::OrganizationName, role.organization());
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = match role {
            Role::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let (from, to) = valid.unwrap_or((2025, 2035));
        params.not_before = date_time_ymd(from, 1, 1);
        params.not_after = date_time_ymd(to, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn write(dir: &Path, name: &str, content: &str, mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    let io = |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    };
    std::fs::write(&path, content).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(io)
}

/// Names become certificate subjects and file names: they follow the node
/// name rule (DNS-1123 subdomain) everywhere.
fn check_names(names: &[String]) -> Result<(), PkiError> {
    for name in names {
        name.parse::<weft_core::domain::NodeName>()
            .map_err(|reason| PkiError::BadName {
                name: name.clone(),
                reason,
            })?;
    }
    Ok(())
}

impl Ca {
    /// The CA `write_cluster` wrote into `dir` (ca.pem, ca-key.pem).
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| PkiError::Io {
                path: path.display().to_string(),
                source,
            })
        };
        let cert_pem = read("ca.pem")?;
        let key = KeyPair::from_pem(&read("ca-key.pem")?)?;
        Ok(Self {
            issuer: Issuer::from_ca_cert_pem(&cert_pem, key)?,
            cert_pem,
        })
    }
}

/// Writes a fresh CA (`ca.pem`, and `ca-key.pem` 0600 to issue more
/// later), a server certificate for `server_sans`, and client certificates:
/// `<role>-<name>.pem` with `<role>-<name>-key.pem` (0600). An existing CA
/// is replaced only with `force`.
pub fn write_cluster(
    dir: &Path,
    server_sans: &[String],
    nodes: &[String],
    admins: &[String],
    viewers: &[String],
    force: bool,
) -> Result<(), PkiError> {
    for names in [nodes, admins, viewers] {
        check_names(names)?;
    }
    let existing = dir.join("ca.pem");
    if existing.exists() && !force {
        return Err(PkiError::CaExists(existing.display().to_string()));
    }
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let ca = Ca::generate("weft-ca")?;
    write(dir, "ca-key.pem", &ca.issuer.key().serialize_pem(), 0o600)?;
    write(dir, "ca.pem", &ca.cert_pem, 0o644)?;
    let server = ca.issue(Role::Server, "weft-server", server_sans, None)?;
    write(dir, "server.pem", &server.cert_pem, 0o644)?;
    write(dir, "server-key.pem", &server.key_pem, 0o600)?;
    issue_clients(&ca, dir, nodes, admins, viewers)
}

/// Issues more client certificates from the CA in `dir`.
pub fn add_certificates(
    dir: &Path,
    nodes: &[String],
    admins: &[String],
    viewers: &[String],
) -> Result<(), PkiError> {
    for names in [nodes, admins, viewers] {
        check_names(names)?;
    }
    if nodes.is_empty() && admins.is_empty() && viewers.is_empty() {
        return Err(PkiError::NothingToIssue);
    }
    let ca = Ca::load(dir)?;
    issue_clients(&ca, dir, nodes, admins, viewers)
}

fn issue_clients(
    ca: &Ca,
    dir: &Path,
    nodes: &[String],
    admins: &[String],
    viewers: &[String],
) -> Result<(), PkiError> {
    for (role, names, prefix) in [
        (Role::Node, nodes, "node"),
        (Role::Admin, admins, "admin"),
        (Role::Viewer, viewers, "viewer"),
    ] {
        for name in names {
            let issued = ca.issue(role, name, &[], None)?;
            write(
                dir,
                &format!("{prefix}-{name}.pem"),
                &issued.cert_pem,
                0o644,
            )?;
            write(
                dir,
                &format!("{prefix}-{name}-key.pem"),
                &issued.key_pem,
                0o600,
            )?;
        }
    }
    Ok(())
}

/// Who a client certificate says its holder is: (role, name).
pub fn subject_of(der: &[u8]) -> Option<(String, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let org = subject
        .iter_organization()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    let cn = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    Some((org, cn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_role_and_name() {
        let ca = Ca::generate("test-ca").unwrap();
        let issued = ca.issue(Role::Node, "node-a", &[], None).unwrap();
        let der = pem_to_der(&issued.cert_pem);
        assert_eq!(
            subject_of(&der),
            Some(("weft-node".into(), "node-a".into()))
        );
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }

    fn tempdir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-pki-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Whether `leaf` (PEM) names the CA certificate `ca` (PEM) as its
    /// issuer, by subject and key identifier. (The TLS suites check the
    /// signatures for real: security.rs connects with such certificates.)
    fn signed_by(leaf: &str, ca: &str) -> bool {
        use x509_parser::extensions::ParsedExtension;
        let (leaf_der, ca_der) = (pem_to_der(leaf), pem_to_der(ca));
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let ski = ca
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            });
        let aki = leaf
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        leaf.issuer() == ca.subject() && ski.is_some() && ski == aki
    }

    #[test]
    fn a_cluster_set_keeps_its_ca_key_private_and_more_certificates_come_from_it() {
        let dir = tempdir("add");
        let sans = vec!["weft-server".to_owned()];
        write_cluster(
            &dir,
            &sans,
            &["node-a".into()],
            &["admin".into()],
            &[],
            false,
        )
        .unwrap();
        assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
        assert_eq!(mode(&dir.join("node-node-a-key.pem")), 0o600);
        let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
        // A node that joins later gets a certificate from the same CA.
        add_certificates(&dir, &["node-b".into()], &[], &["ro".into()]).unwrap();
        let b = std::fs::read_to_string(dir.join("node-node-b.pem")).unwrap();
        assert!(
            signed_by(&b, &ca),
            "node-b's certificate is not from the CA"
        );
        assert_eq!(
            subject_of(&pem_to_der(&b)),
            Some(("weft-node".into(), "node-b".into()))
        );
        assert!(dir.join("viewer-ro.pem").exists());
        assert_eq!(
            std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
            ca,
            "CA untouched"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_existing_ca_is_replaced_only_when_asked_and_names_are_checked() {
        let dir = tempdir("force");
        let sans = vec!["weft-server".to_owned()];
        write_cluster(&dir, &sans, &[], &[], &[], false).unwrap();
        let first = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
        let err = write_cluster(&dir, &sans, &[], &[], &[], false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(std::fs::read_to_string(dir.join("ca.pem")).unwrap(), first);
        write_cluster(&dir, &sans, &[], &[], &[], true).unwrap();
        assert_ne!(std::fs::read_to_string(dir.join("ca.pem")).unwrap(), first);
        for bad in ["Node_A", "../etc", ""] {
            let err = add_certificates(&dir, &[bad.to_owned()], &[], &[]).unwrap_err();
            assert!(err.to_string().contains("invalid name"), "{bad}: {err}");
        }
        assert!(matches!(
            add_certificates(&dir, &[], &[], &[]),
            Err(PkiError::NothingToIssue)
        ));
        let missing = add_certificates(&tempdir("none"), &["n".into()], &[], &[]).unwrap_err();
        assert!(missing.to_string().contains("ca.pem"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
