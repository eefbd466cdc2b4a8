//! The host filesystem boundary against a real temporary tree: exact modes under any umask,
//! owners, links never followed, directories emptied.

use super::*;
use std::os::unix::fs::PermissionsExt;

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Runs `f` with the process umask set to `mask` (restored after).
fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
    let old = rustix::process::umask(Mode::from_raw_mode(mask));
    let out = f();
    rustix::process::umask(old);
    out
}

#[test]
fn writes_atomically_with_mode_and_skips_identical_content() {
    let dir = tempfile::tempdir().unwrap();
    let fs = RootedFs::new(dir.path());
    let path = "/opt/x/bin/start.sh";
    assert_eq!(fs.read(path).unwrap(), None);
    let w = |m| fs.write_atomic(path, b"a", Perms::mode(m)).unwrap();
    assert_eq!(w(0o755), Written::Updated);
    assert_eq!(w(0o755), Written::Unchanged);
    assert_eq!(w(0o700), Written::Updated);
    let real = fs.resolve(path);
    assert_eq!(mode_of(&real), 0o700);
    assert_eq!(fs.read(path).unwrap().unwrap(), b"a");
    let leftovers = std::fs::read_dir(real.parent().unwrap()).unwrap().count();
    assert_eq!(leftovers, 1, "no temporary file left behind");
}

/// The unit's `UMask=0027` made new directories 0750 root:root: Consul (uid 100) could not
/// reach its configuration. Whatever the umask, directories and files get what is asked.
#[test]
fn modes_are_exact_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let fs = RootedFs::new(dir.path());
    with_umask(0o027, || {
        fs.write_atomic(
            "/opt/consul/config/consul-agent.json",
            b"{}",
            Perms::mode(0o644),
        )
        .unwrap();
        fs.create_dir_all("/opt/consul/data", Perms::mode(0o755))
            .unwrap();
        fs.create_dir_all("/srv/private/x", Perms::mode(0o700))
            .unwrap();
    });
    for (path, mode) in [
        ("/opt", 0o755),
        ("/opt/consul", 0o755),
        ("/opt/consul/config", 0o755),
        ("/opt/consul/config/consul-agent.json", 0o644),
        ("/opt/consul/data", 0o755),
        ("/srv", 0o755),
        ("/srv/private", 0o755),
        ("/srv/private/x", 0o700),
    ] {
        assert_eq!(mode_of(&fs.resolve(path)), mode, "{path}");
    }
    // Nothing blocks a reader that is not root.
    let consul = Some(Owner {
        uid: 100,
        gid: 1000,
    });
    let file = "/opt/consul/config/consul-agent.json";
    assert_eq!(blocked_ancestor(&fs, file, consul).unwrap(), None);
    std::fs::set_permissions(
        fs.resolve("/opt/consul/config"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    let (dir, meta) = blocked_ancestor(&fs, file, consul).unwrap().unwrap();
    assert_eq!((dir.as_str(), meta.mode), ("/opt/consul/config", 0o750));
}

#[test]
fn owners_are_set_and_resolved_from_the_hosts_tables() {
    let dir = tempfile::tempdir().unwrap();
    let fs = RootedFs::new(dir.path());
    fs.write_atomic(
        "/etc/passwd",
        b"root:x:0:0::/root:/bin/sh\nconsul:x:100:1000::/:/bin/false\n",
        Perms::mode(0o644),
    )
    .unwrap();
    fs.write_atomic(
        "/etc/group",
        b"root:x:0:\nconsul:x:1000:\nnodeagent:x:995:alice\n",
        Perms::mode(0o644),
    )
    .unwrap();
    let o = |uid, gid| Owner { uid, gid };
    assert_eq!(fs.resolve_owner("100:1000").unwrap(), o(100, 1000));
    assert_eq!(fs.resolve_owner("100").unwrap(), o(100, 100));
    assert_eq!(fs.resolve_owner("consul").unwrap(), o(100, 1000));
    assert_eq!(fs.resolve_owner("consul:nodeagent").unwrap(), o(100, 995));
    let err = fs.resolve_owner("vault").unwrap_err().to_string();
    assert!(
        err.contains("no user vault") && err.contains("100:1000"),
        "{err}"
    );
    assert_eq!(fs.group_id("nodeagent").unwrap(), Some(995));
    assert_eq!(fs.group_id("docker").unwrap(), None);

    let secret = Perms {
        mode: 0o640,
        owner: Some(o(100, 1000)),
    };
    let path = "/opt/consul/config/token.json";
    assert_eq!(
        fs.write_atomic(path, b"t", secret).unwrap(),
        Written::Updated
    );
    let meta = fs.metadata(path).unwrap().unwrap();
    assert_eq!((meta.mode, meta.uid, meta.gid), (0o640, 100, 1000));
    assert_eq!(
        fs.write_atomic(path, b"t", secret).unwrap(),
        Written::Unchanged
    );
    let root_owned = Perms {
        owner: Some(o(0, 0)),
        ..secret
    };
    assert_eq!(
        fs.write_atomic(path, b"t", root_owned).unwrap(),
        Written::Updated,
        "a new owner is a change"
    );
}

#[test]
fn links_are_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let fs = RootedFs::new(dir.path());
    fs.create_dir_all("/opt/consul/data", Perms::mode(0o755))
        .unwrap();
    // A task's container planted links in its own directory.
    std::os::unix::fs::symlink(outside.path(), fs.resolve("/opt/consul/data/config")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("victim"),
        fs.resolve("/opt/consul/data/file"),
    )
    .unwrap();
    std::fs::write(outside.path().join("victim"), "keep").unwrap();
    let err = fs
        .write_atomic("/opt/consul/data/config/x.json", b"{}", Perms::mode(0o644))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("refusing to follow the symbolic link"),
        "{err}"
    );
    assert!(
        std::fs::read_dir(outside.path()).unwrap().count() == 1,
        "nothing written outside"
    );
    // A link in the file's own place is replaced, not written through.
    fs.write_atomic("/opt/consul/data/file", b"new", Perms::mode(0o644))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(outside.path().join("victim")).unwrap(),
        "keep"
    );
    assert!(
        !fs.metadata("/opt/consul/data/file")
            .unwrap()
            .unwrap()
            .is_symlink
    );
    // Removing through a link removes the link, not what it points to.
    std::os::unix::fs::symlink(outside.path(), fs.resolve("/opt/consul/data/config2")).unwrap();
    assert_eq!(
        fs.empty("/opt/consul/data").unwrap(),
        ["config", "config2", "file"]
    );
    assert_eq!(
        std::fs::read_to_string(outside.path().join("victim")).unwrap(),
        "keep"
    );
}

#[test]
fn empty_keeps_the_directory_and_remove_takes_it() {
    let dir = tempfile::tempdir().unwrap();
    let fs = RootedFs::new(dir.path());
    fs.write_atomic(
        "/var/lib/nodeagent/instance-id",
        b"i-1\n",
        Perms::mode(0o644),
    )
    .unwrap();
    fs.write_atomic("/var/lib/nodeagent/sub/deep/f", b"x", Perms::mode(0o600))
        .unwrap();
    assert_eq!(
        fs.empty("/var/lib/nodeagent").unwrap(),
        ["instance-id", "sub"]
    );
    assert!(fs.metadata("/var/lib/nodeagent").unwrap().unwrap().is_dir);
    assert!(fs.list("/var/lib/nodeagent").unwrap().is_empty());
    assert!(fs.empty("/nowhere").unwrap().is_empty());
    assert!(fs.remove("/var/lib/nodeagent").unwrap());
    assert!(!fs.remove("/var/lib/nodeagent").unwrap());
}

#[test]
fn lists_sorted() {
    let dir = tempfile::tempdir().unwrap();
    let fs = RootedFs::new(dir.path());
    assert!(fs.list("/etc/nodeagent/conf.d").unwrap().is_empty());
    fs.write_atomic("/d/b.toml", b"", Perms::mode(0o644))
        .unwrap();
    fs.write_atomic("/d/a.toml", b"", Perms::mode(0o644))
        .unwrap();
    assert_eq!(fs.list("/d").unwrap(), ["a.toml", "b.toml"]);
}
