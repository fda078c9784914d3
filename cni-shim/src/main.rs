//! The `weft` CNI plugin binary: reads the CNI environment and stdin and
//! hands them to the library, which forwards them to weft-agent.

use std::io::Read;

fn main() {
    // Run by hand (not by a runtime, which sets CNI_COMMAND and passes no
    // arguments): say what this is instead of a CNI error.
    if std::env::var_os("CNI_COMMAND").is_none()
        && let Some(arg) = std::env::args().nth(1)
    {
        let mut out = std::io::stdout().lock();
        let code = weft_cni::run_by_hand(&arg, &mut out);
        std::process::exit(code);
    }
    let env = weft_cni::CNI_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect();
    let mut stdin = Vec::new();
    // An unreadable stdin is forwarded as empty; the agent reports it.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let code = weft_cni::run(env, stdin, &mut std::io::stdout().lock());
    std::process::exit(code);
}
