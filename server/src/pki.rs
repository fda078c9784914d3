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

/// Writes a fresh CA, a server certificate for `server_sans`, and client
/// certificates: `<role>-<name>.pem` with `<role>-<name>-key.pem` (0600).
pub fn write_cluster(
    dir: &Path,
    server_sans: &[String],
    nodes: &[String],
    admins: &[String],
    viewers: &[String],
) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let ca = Ca::generate("weft-ca")?;
    write(dir, "ca.pem", &ca.cert_pem, 0o644)?;
    let server = ca.issue(Role::Server, "weft-server", server_sans, None)?;
    write(dir, "server.pem", &server.cert_pem, 0o644)?;
    write(dir, "server-key.pem", &server.key_pem, 0o600)?;
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
}
