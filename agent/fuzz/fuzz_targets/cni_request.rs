//! Fuzzes the CNI request parser with arbitrary stdin and environment.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte picks the command, the next 64 bytes feed CNI_ARGS and
    // CNI_IFNAME, the rest is stdin.
    let commands = ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "BOGUS"];
    let Some((&pick, rest)) = data.split_first() else { return };
    let (env_bytes, stdin) = rest.split_at(rest.len().min(64));
    let text = String::from_utf8_lossy(env_bytes);
    let (args, ifname) = text.split_at(text.len() / 2);
    let env: HashMap<String, String> = [
        ("CNI_COMMAND", commands[usize::from(pick) % commands.len()]),
        ("CNI_CONTAINERID", "fuzz"),
        ("CNI_NETNS", "/var/run/netns/fuzz"),
        ("CNI_IFNAME", ifname),
        ("CNI_ARGS", args),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let _ = weft_agent::cni::request::parse(&env, stdin);
});
