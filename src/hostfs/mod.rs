//! Host filesystem boundary: owns every read and write nodeagent does on the host's files.
//!
//! Paths are host paths ("/etc/ecs/ecs.config"); [`RootedFs`] places them under a root
//! directory (`--root`), so the whole agent can run unprivileged against a temporary tree.
//!
//! Writes are exact and never fooled:
//! - every write is atomic: a temporary file in the same directory, fsync, rename, fsync of the
//!   directory; a file whose content, mode and owner are already right is not touched at all;
//! - modes are exactly what the caller asks for, whatever the process's umask (the unit runs
//!   with `UMask=0027`): files and every directory nodeagent creates are chmod-ed after they are
//!   made, so a container user such as Consul's uid 100 can read what it is meant to read;
//! - a file may be given an owner (`fchown` before the rename: CAP_CHOWN);
//! - no write follows a symbolic link: the path is walked one directory at a time from the root
//!   with `openat(O_NOFOLLOW)`, and the file is created and renamed relative to the directory
//!   found, so a link planted in a task directory (which containers may write) cannot redirect
//!   a write or a removal elsewhere.

use rustix::fs::{AtFlags, Dir, FileType, Gid, Mode, OFlags, Uid, CWD};
use rustix::io::Errno;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Unchanged,
    Updated,
}

/// A numeric owner: user and group ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// The permission bits and, optionally, the owner a file or directory must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    pub mode: u32,
    pub owner: Option<Owner>,
}

impl Perms {
    /// `mode`, owned by whoever creates it (root on a node).
    pub const fn mode(mode: u32) -> Perms {
        Perms { mode, owner: None }
    }
}

/// Directories nodeagent creates on the way to a file: everyone may pass (a container user
/// reads the file inside), only root may write.
pub const PARENT_DIRS: Perms = Perms::mode(0o755);

/// What `stat` says about a path (the path itself, not what a link points to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub is_dir: bool,
    pub is_symlink: bool,
}

impl Meta {
    pub fn owner(&self) -> Owner {
        Owner {
            uid: self.uid,
            gid: self.gid,
        }
    }

    /// Whether `reader` (`None`: anyone) may pass through this directory.
    pub fn searchable_by(&self, reader: Option<Owner>) -> bool {
        let bit = match reader {
            Some(r) if r.uid == 0 => return true,
            Some(r) if r.uid == self.uid => 0o100,
            Some(r) if r.gid == self.gid => 0o010,
            _ => 0o001,
        };
        self.mode & bit != 0
    }
}

pub trait HostFs: Send + Sync {
    /// The file's bytes, or `None` when it does not exist.
    fn read(&self, path: &str) -> io::Result<Option<Vec<u8>>>;
    /// The path's metadata (not following a final link), `None` when it does not exist.
    fn metadata(&self, path: &str) -> io::Result<Option<Meta>>;
    /// Replaces the file atomically with `contents`, exactly `perms`.
    fn write_atomic(&self, path: &str, contents: &[u8], perms: Perms) -> io::Result<Written>;
    /// Creates the directory and its parents: the directory gets exactly `perms`, parents it
    /// creates [`PARENT_DIRS`]; existing directories are left as they are.
    fn create_dir_all(&self, path: &str, perms: Perms) -> io::Result<()>;
    /// Names of the directory's entries, sorted; empty when it does not exist.
    fn list(&self, dir: &str) -> io::Result<Vec<String>>;
    /// Removes the file, or the directory and everything in it; `false` when nothing was
    /// there.
    fn remove(&self, path: &str) -> io::Result<bool>;
    /// Removes everything inside the directory and keeps the directory itself (it may be a
    /// mount point, or belong to a package); the names removed, sorted.
    fn empty(&self, dir: &str) -> io::Result<Vec<String>>;

    /// The id of group `name` in the host's /etc/group.
    fn group_id(&self, name: &str) -> io::Result<Option<u32>> {
        Ok(table(self, "/etc/group")?.into_iter().find_map(|f| {
            (f.first().map(String::as_str) == Some(name))
                .then(|| f.get(2)?.parse().ok())
                .flatten()
        }))
    }

    /// User `name` in the host's /etc/passwd: its uid and primary group.
    fn user(&self, name: &str) -> io::Result<Option<Owner>> {
        Ok(table(self, "/etc/passwd")?.into_iter().find_map(|f| {
            (f.first().map(String::as_str) == Some(name)).then(|| {
                Some(Owner {
                    uid: f.get(2)?.parse().ok()?,
                    gid: f.get(3)?.parse().ok()?,
                })
            })?
        }))
    }

    /// An owner as the configuration writes it: `UID:GID`, `UID`, `USER` or `USER:GROUP`;
    /// names are looked up in the host's /etc/passwd and /etc/group (a user alone brings its
    /// primary group, a uid alone gid = uid).
    fn resolve_owner(&self, spec: &str) -> io::Result<Owner> {
        let not_found = |what: String| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("owner {spec:?}: {what}; name the owner by number instead, such as \"100:1000\""),
            )
        };
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let (uid, primary) = match user.parse::<u32>() {
            Ok(uid) => (uid, uid),
            Err(_) => {
                let o = self.user(user)?.ok_or_else(|| {
                    not_found(format!("no user {user} in the host's /etc/passwd"))
                })?;
                (o.uid, o.gid)
            }
        };
        let gid = match group {
            None => primary,
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => self
                    .group_id(g)?
                    .ok_or_else(|| not_found(format!("no group {g} in the host's /etc/group")))?,
            },
        };
        Ok(Owner { uid, gid })
    }
}

/// The lines of a colon-separated host table (/etc/passwd, /etc/group), split into fields.
fn table(fs: &(impl HostFs + ?Sized), path: &str) -> io::Result<Vec<Vec<String>>> {
    let Some(bytes) = fs.read(path)? else {
        return Ok(Vec::new());
    };
    Ok(String::from_utf8_lossy(&bytes)
        .lines()
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect())
}

/// The first directory on the way to `path` (excluding `path`) that `reader` (`None`: anyone)
/// may not pass through, with its metadata: a file there cannot be read by that user whatever
/// the file's own mode.
pub fn blocked_ancestor(
    fs: &dyn HostFs,
    path: &str,
    reader: Option<Owner>,
) -> io::Result<Option<(String, Meta)>> {
    let mut dir = String::new();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for part in parts.iter().take(parts.len().saturating_sub(1)) {
        dir.push('/');
        dir.push_str(part);
        match fs.metadata(&dir)? {
            Some(meta) if meta.is_dir && !meta.searchable_by(reader) => {
                return Ok(Some((dir, meta)))
            }
            _ => {}
        }
    }
    Ok(None)
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

    /// The components of a host path; `.`, `..` and empty paths are refused.
    fn parts<'p>(&self, path: &'p str) -> io::Result<Vec<&'p str>> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        if parts.is_empty() || parts.iter().any(|p| *p == "." || *p == "..") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path:?} is not a normal absolute path"),
            ));
        }
        Ok(parts)
    }

    /// Opens the directory `parts` below the root, one component at a time, never following
    /// a link. With `create`, missing directories are made: the last one with `create`, the
    /// ones before it with [`PARENT_DIRS`]. `None` when a directory is missing and not made.
    fn open_dir(&self, parts: &[&str], create: Option<Perms>) -> io::Result<Option<OwnedFd>> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut fd = rustix::fs::openat(CWD, &self.root, flags, Mode::empty())
            .map_err(|e| at(&self.root, "cannot open")(e.into()))?;
        let mut shown = self.root.clone();
        for (i, part) in parts.iter().enumerate() {
            shown.push(part);
            fd = match rustix::fs::openat(&fd, *part, flags, Mode::empty()) {
                Ok(next) => next,
                Err(Errno::NOENT) => {
                    let Some(last) = create else { return Ok(None) };
                    let perms = if i + 1 == parts.len() {
                        last
                    } else {
                        PARENT_DIRS
                    };
                    let made = match rustix::fs::mkdirat(&fd, *part, Mode::from_raw_mode(0o700)) {
                        Ok(()) => true,
                        Err(Errno::EXIST) => false, // made by someone else meanwhile
                        Err(e) => return Err(at(&shown, "cannot create directory")(e.into())),
                    };
                    let next = rustix::fs::openat(&fd, *part, flags, Mode::empty())
                        .map_err(|e| refuse_link(&fd, part, &shown, e))?;
                    if made {
                        set_perms(&next, perms).map_err(at(&shown, "cannot set the mode of"))?;
                    }
                    next
                }
                Err(e) => return Err(refuse_link(&fd, part, &shown, e)),
            };
        }
        Ok(Some(fd))
    }

    /// The parent directory of `path` (made if `create`) and the file's name in it.
    fn parent<'p>(&self, path: &'p str, create: bool) -> io::Result<Option<(OwnedFd, &'p str)>> {
        let parts = self.parts(path)?;
        let (name, dirs) = parts.split_last().expect("parts() refuses empty paths");
        let dir = self.open_dir(dirs, create.then_some(PARENT_DIRS))?;
        Ok(dir.map(|d| (d, *name)))
    }
}

/// Sets exactly `perms` on an open file or directory (not subject to the umask).
fn set_perms(fd: impl AsFd, perms: Perms) -> io::Result<()> {
    if let Some(o) = perms.owner {
        rustix::fs::fchown(&fd, Some(Uid::from_raw(o.uid)), Some(Gid::from_raw(o.gid)))?;
    }
    // After the chown, which clears set-id bits.
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(perms.mode))?;
    Ok(())
}

/// The error for a component that could not be opened as a directory: a link is refused by
/// name, anything else reported as it is.
fn refuse_link(dir: &OwnedFd, name: &str, shown: &Path, e: Errno) -> io::Error {
    let link = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Symlink);
    if link {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refusing to follow the symbolic link {}: nodeagent writes only through real directories (a task may have planted it); remove it",
                shown.display()
            ),
        )
    } else {
        at(shown, "cannot open directory")(e.into())
    }
}

/// Wraps an io error with the path it happened on, so every message names the file.
fn at<'a>(path: &'a Path, what: &str) -> impl FnOnce(io::Error) -> io::Error + 'a {
    let what = what.to_string();
    move |e| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Removes everything inside the open directory `dir` (shown as `shown`), never following a
/// link; returns the names removed.
fn empty_fd(dir: &OwnedFd, shown: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = Dir::read_from(dir).map_err(|e| at(shown, "cannot list")(e.into()))?;
    for entry in entries {
        let entry = entry.map_err(|e| at(shown, "cannot list")(e.into()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        remove_at(dir, &name, &shown.join(&name))?;
        names.push(name);
    }
    names.sort();
    Ok(names)
}

/// Removes `name` in `dir`: a file or link, or a directory and everything in it.
fn remove_at(dir: &OwnedFd, name: &str, shown: &Path) -> io::Result<()> {
    let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| at(shown, "cannot read")(e.into()))?;
    if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let sub = rustix::fs::openat(dir, name, flags, Mode::empty())
            .map_err(|e| at(shown, "cannot open directory")(e.into()))?;
        empty_fd(&sub, shown)?;
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())
    }
    .map_err(|e| at(shown, "cannot remove")(e.into()))
}

impl HostFs for RootedFs {
    fn read(&self, path: &str) -> io::Result<Option<Vec<u8>>> {
        let real = self.resolve(path);
        match std::fs::read(&real) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(at(&real, "cannot read")(e)),
        }
    }

    fn metadata(&self, path: &str) -> io::Result<Option<Meta>> {
        use std::os::unix::fs::MetadataExt;
        let real = self.resolve(path);
        match std::fs::symlink_metadata(&real) {
            Ok(m) => Ok(Some(Meta {
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                is_dir: m.is_dir(),
                is_symlink: m.file_type().is_symlink(),
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(at(&real, "cannot read")(e)),
        }
    }

    fn write_atomic(&self, path: &str, contents: &[u8], perms: Perms) -> io::Result<Written> {
        let real = self.resolve(path);
        let (dir, name) = self.parent(path, true)?.expect("created");
        // Unchanged: the same bytes, mode and owner, in a regular file (a link is replaced).
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if let Ok(fd) = rustix::fs::openat(&dir, name, flags, Mode::empty()) {
            let stat = rustix::fs::fstat(&fd)?;
            let same_owner = perms
                .owner
                .is_none_or(|o| o.uid == stat.st_uid && o.gid == stat.st_gid);
            if FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile
                && stat.st_mode & 0o7777 == perms.mode
                && same_owner
            {
                // The old file may hold a secret: zeroed when dropped (sized up front, so no
                // buffer is left behind by growing).
                let mut existing =
                    zeroize::Zeroizing::new(Vec::with_capacity(stat.st_size as usize + 1));
                io::Read::read_to_end(&mut std::fs::File::from(fd), &mut existing)
                    .map_err(at(&real, "cannot read"))?;
                if existing.as_slice() == contents {
                    return Ok(Written::Unchanged);
                }
            }
        }
        let tmp = format!(".nodeagent-{:016x}", rand::random::<u64>());
        let create =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&dir, tmp.as_str(), create, Mode::from_raw_mode(0o600))
            .map_err(|e| at(&real, "cannot create a temporary file for")(e.into()))?;
        let written = (|| {
            let mut file = std::fs::File::from(fd);
            file.write_all(contents)
                .map_err(at(&real, "cannot write"))?;
            set_perms(&file, perms).map_err(at(&real, "cannot set the mode or owner of"))?;
            file.sync_all().map_err(at(&real, "cannot fsync"))?;
            rustix::fs::renameat(&dir, tmp.as_str(), &dir, name)
                .map_err(|e| at(&real, "cannot rename into place")(e.into()))?;
            rustix::fs::fsync(&dir)
                .map_err(|e| at(&real, "cannot fsync the directory of")(e.into()))
        })();
        if written.is_err() {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
        }
        written.map(|()| Written::Updated)
    }

    fn create_dir_all(&self, path: &str, perms: Perms) -> io::Result<()> {
        let parts = self.parts(path)?;
        self.open_dir(&parts, Some(perms)).map(|_| ())
    }

    fn remove(&self, path: &str) -> io::Result<bool> {
        let Some((dir, name)) = self.parent(path, false)? else {
            return Ok(false);
        };
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => remove_at(&dir, name, &self.resolve(path)).map(|()| true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(at(&self.resolve(path), "cannot read")(e.into())),
        }
    }

    fn empty(&self, dir: &str) -> io::Result<Vec<String>> {
        let parts = self.parts(dir)?;
        match self.open_dir(&parts, None)? {
            Some(fd) => empty_fd(&fd, &self.resolve(dir)),
            None => Ok(Vec::new()),
        }
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let real = self.resolve(dir);
        let entries = match std::fs::read_dir(&real) {
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
mod tests;
