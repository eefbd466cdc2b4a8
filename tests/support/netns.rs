//! A network namespace of the test's own: the test runs again, alone, in a child process made
//! with `unshare --net`, whose loopback is its own. Everything it starts there — the world, a
//! Docker engine and the containers of its host network, nodeagent — shares that loopback, so
//! the stand-in images can listen on the real images' fixed ports (Consul 8500, linkerd 9990)
//! while other tests do the same in parallel, and only loopback addresses are ever used.

use std::process::Command;

/// Set in the child: the test is already in its own namespace.
const INSIDE: &str = "NODEAGENT_TEST_NETNS";

/// This program again, in a network namespace of its own with its loopback up.
fn again(name: &str) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--net",
        "--",
        "sh",
        "-c",
        "ip link set lo up && exec \"$@\"",
        "sh",
    ])
    // This process's own executable, through /proc while it waits for the child: it runs even
    // when a newer build has replaced the file at its path meanwhile.
    .arg(format!("/proc/{}/exe", std::process::id()))
    .env(INSIDE, name);
    cmd
}

const NEEDS: &str = "run unshare (util-linux): these tests need network namespaces (root)";

/// Call first in a test, with the test's function name: `false` in the test as cargo started it (the
/// test has then run, and passed, in its own namespace: return), `true` inside (go on).
pub fn enter(test: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        return true;
    }
    // The test's full path (`module::name`) is its thread's name under libtest.
    let current = std::thread::current();
    let full = current
        .name()
        .filter(|n| n.rsplit("::").next() == Some(test))
        .unwrap_or(test);
    let out = again(test)
        .args([full, "--exact", "--nocapture", "--test-threads=1"])
        .output()
        .expect(NEEDS);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{test}, run in its own network namespace, failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    // Shown with --nocapture, and for a failure elsewhere in the test.
    println!("{stdout}");
    false
}

/// [`enter`] for a whole program (a benchmark): it runs again with the same arguments in its
/// own namespace, its output passed through. `false` outside (it has run: exit), `true` inside.
pub fn enter_program() -> bool {
    if std::env::var_os(INSIDE).is_some() {
        return true;
    }
    let status = again("program")
        .args(std::env::args_os().skip(1))
        .status()
        .expect(NEEDS);
    assert!(
        status.success(),
        "run in its own network namespace, it failed ({status})"
    );
    false
}
