//! Host filesystem boundary: owns every read and write nodeagent does on the host's files.
//!
//! Paths are host paths ("/etc/ecs/ecs.config"); [`RootedFs`] places them under a root
//! directory (`--root`), so the whole agent can run unprivileged against a temporary tree.
//! Every write is atomic: a temporary file in the same directory, fsync, rename, fsync of the
//! directory. A file whose content and mode are already right is not touched at all.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Unchanged,
    Updated,
}

pub trait HostFs: Send + Sync {
    /// The file's bytes, or `None` when it does not exist.
    fn read(&self, path: &str) -> io::Result<Option<Vec<u8>>>;
    /// Replaces the file atomically with `contents` and permission bits `mode`.
    fn write_atomic(&self, path: &str, contents: &[u8], mode: u32) -> io::Result<Written>;
    /// Creates the directory and its parents (new directories get `mode`).
    fn create_dir_all(&self, path: &str, mode: u32) -> io::Result<()>;
    /// Names of the directory's entries, sorted; empty when it does not exist.
    fn list(&self, dir: &str) -> io::Result<Vec<String>>;
    /// Removes the file, or the directory and everything in it; `false` when nothing was
    /// there.
    fn remove(&self, path: &str) -> io::Result<bool>;

    /// The id of group `name` in the host's /etc/group.
    fn group_id(&self, name: &str) -> io::Result<Option<u32>> {
        let Some(bytes) = self.read("/etc/group")? else {
            return Ok(None);
        };
        Ok(String::from_utf8_lossy(&bytes).lines().find_map(|line| {
            let mut fields = line.split(':');
            (fields.next() == Some(name))
                .then(|| fields.nth(1)?.parse().ok())
                .flatten()
        }))
    }
}

/// The real filesystem, with every host path placed under `root` ("/" on a node).
#[derive(Debug, Clone)]
pub struct RootedFs {
    root: PathBuf,
}

impl RootedFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        RootedFs { root: root.into() }
    }

    /// The real path of a host path.
    pub fn resolve(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }
}

/// Wraps an io error with the path it happened on, so every message names the file.
fn at<'a>(path: &'a Path, what: &str) -> impl FnOnce(io::Error) -> io::Error + 'a {
    let what = what.to_string();
    move |e| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

impl HostFs for RootedFs {
    fn read(&self, path: &str) -> io::Result<Option<Vec<u8>>> {
        let real = self.resolve(path);
        match fs::read(&real) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(at(&real, "cannot read")(e)),
        }
    }

    fn write_atomic(&self, path: &str, contents: &[u8], mode: u32) -> io::Result<Written> {
        let real = self.resolve(path);
        if let Ok(meta) = fs::metadata(&real) {
            if meta.permissions().mode() & 0o7777 == mode && fs::read(&real)? == contents {
                return Ok(Written::Unchanged);
            }
        }
        let dir = real.parent().unwrap_or(Path::new("/"));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(at(dir, "cannot create directory"))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".nodeagent-")
            .tempfile_in(dir)
            .map_err(at(dir, "cannot create a temporary file in"))?;
        tmp.write_all(contents).map_err(at(&real, "cannot write"))?;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(mode))
            .map_err(at(&real, "cannot set the mode of"))?;
        tmp.as_file()
            .sync_all()
            .map_err(at(&real, "cannot fsync"))?;
        tmp.persist(&real)
            .map_err(|e| at(&real, "cannot rename into place")(e.error))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(at(dir, "cannot fsync directory"))?;
        Ok(Written::Updated)
    }

    fn create_dir_all(&self, path: &str, mode: u32) -> io::Result<()> {
        let real = self.resolve(path);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&real)
            .map_err(at(&real, "cannot create directory"))
    }

    fn remove(&self, path: &str) -> io::Result<bool> {
        let real = self.resolve(path);
        let meta = match fs::symlink_metadata(&real) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(at(&real, "cannot read")(e)),
        };
        if meta.is_dir() {
            fs::remove_dir_all(&real).map_err(at(&real, "cannot remove"))?;
        } else {
            fs::remove_file(&real).map_err(at(&real, "cannot remove"))?;
        }
        Ok(true)
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let real = self.resolve(dir);
        let entries = match fs::read_dir(&real) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(at(&real, "cannot list")(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(at(&real, "cannot list"))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_with_mode_and_skips_identical_content() {
        let dir = tempfile::tempdir().unwrap();
        let fs = RootedFs::new(dir.path());
        let path = "/opt/x/bin/start.sh";
        assert_eq!(fs.read(path).unwrap(), None);
        assert_eq!(
            fs.write_atomic(path, b"a", 0o755).unwrap(),
            Written::Updated
        );
        assert_eq!(
            fs.write_atomic(path, b"a", 0o755).unwrap(),
            Written::Unchanged
        );
        assert_eq!(
            fs.write_atomic(path, b"a", 0o700).unwrap(),
            Written::Updated
        );
        let real = fs.resolve(path);
        assert_eq!(
            fs::metadata(&real).unwrap().permissions().mode() & 0o7777,
            0o700
        );
        assert_eq!(fs.read(path).unwrap().unwrap(), b"a");
        let leftovers = fs::read_dir(real.parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file left behind");
    }

    #[test]
    fn lists_sorted_and_finds_groups() {
        let dir = tempfile::tempdir().unwrap();
        let fs = RootedFs::new(dir.path());
        assert!(fs.list("/etc/nodeagent/conf.d").unwrap().is_empty());
        fs.write_atomic("/etc/group", b"root:x:0:\nnodeagent:x:995:alice\n", 0o644)
            .unwrap();
        fs.write_atomic("/d/b.toml", b"", 0o644).unwrap();
        fs.write_atomic("/d/a.toml", b"", 0o644).unwrap();
        assert_eq!(fs.list("/d").unwrap(), ["a.toml", "b.toml"]);
        assert_eq!(fs.group_id("nodeagent").unwrap(), Some(995));
        assert_eq!(fs.group_id("docker").unwrap(), None);
    }
}
