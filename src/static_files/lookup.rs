//! Finding the file on disk: roots in order, a directory's index, symbolic links kept
//! inside their root, precompressed siblings. Every call here may block on the disk,
//! so the whole lookup runs as one task on tokio's blocking pool.

use std::fs::{self, File, Metadata};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::path::RelativePath;
use crate::config::{Compression, StaticConfig};

/// What the request asks for.
pub struct Wanted {
    pub path: RelativePath,
    /// Codings the client accepts from a precompressed sibling, best first; empty when
    /// a sibling must not be served (a Range request, or `precompressed = false`).
    pub codings: Vec<Compression>,
}

pub enum Found {
    File(Opened),
    /// A directory with an index, named without its trailing slash.
    DirectoryWithoutSlash,
}

/// The file to send, open, with what its headers need.
pub struct Opened {
    pub file: File,
    pub len: u64,
    pub modified: SystemTime,
    /// The requested file's path, whose extension gives the Content-Type (a sibling
    /// keeps the original's type, a symbolic link the name it was asked by).
    pub name: PathBuf,
    /// Set when a precompressed sibling is sent instead of the file.
    pub encoding: Option<Compression>,
    /// A sibling exists, so the answer depends on `Accept-Encoding`.
    pub varies: bool,
}

/// Why no file is sent.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no such file")]
    NotFound,
    #[error("{} leads outside its root {} (allow_symlinks_outside is off)", .path.display(), .root.display())]
    OutsideRoot { path: PathBuf, root: PathBuf },
    #[error("permission denied on {}: {source}", .path.display())]
    Denied { path: PathBuf, source: io::Error },
    #[error("cannot read {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
}

impl LookupError {
    fn from_io(path: &Path, source: io::Error) -> LookupError {
        let path = path.to_path_buf();
        match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => LookupError::NotFound,
            io::ErrorKind::PermissionDenied => LookupError::Denied { path, source },
            _ => LookupError::Io { path, source },
        }
    }
}

/// Tries each root in order: the first that holds the file wins.
pub fn find(site: &StaticConfig, wanted: &Wanted) -> Result<Found, LookupError> {
    for root in &site.roots {
        if let Some(found) = find_in(site, root, wanted)? {
            return Ok(found);
        }
    }
    Err(LookupError::NotFound)
}

/// `None` when this root does not hold the file (the next root is tried).
fn find_in(
    site: &StaticConfig,
    root: &Path,
    wanted: &Wanted,
) -> Result<Option<Found>, LookupError> {
    let mut path = root.to_path_buf();
    path.extend(&wanted.path.segments);
    let Some(meta) = stat(&path)? else {
        return Ok(None);
    };
    if meta.is_dir() {
        // No listings: a directory is its index file or nothing.
        path.push(&site.index);
        if !stat(&path)?.is_some_and(|m| m.is_file()) {
            return Ok(None);
        }
        if !wanted.path.trailing_slash {
            return Ok(Some(Found::DirectoryWithoutSlash));
        }
    } else if wanted.path.trailing_slash || !meta.is_file() {
        // `file.js/` is not a directory; FIFOs and devices are never served.
        return Ok(None);
    }
    open(site, root, path, wanted).map(|opened| Some(Found::File(opened)))
}

/// The file's metadata through symbolic links, `None` when there is nothing there.
fn stat(path: &Path) -> Result<Option<Metadata>, LookupError> {
    match fs::metadata(path) {
        Ok(meta) => Ok(Some(meta)),
        Err(e) => match LookupError::from_io(path, e) {
            LookupError::NotFound => Ok(None),
            other => Err(other),
        },
    }
}

/// Opens the file, or the best sibling the client accepts.
fn open(
    site: &StaticConfig,
    root: &Path,
    name: PathBuf,
    wanted: &Wanted,
) -> Result<Opened, LookupError> {
    let real = confine(site, root, &name)?;
    let (file, meta) = open_regular(&real)?;
    let modified = meta.modified().unwrap_or(UNIX_EPOCH);
    let siblings = if site.precompressed {
        fresh_siblings(&name, modified)
    } else {
        Vec::new()
    };
    let varies = !siblings.is_empty();
    let chosen = wanted
        .codings
        .iter()
        .find_map(|coding| siblings.iter().find(|(c, _)| c == coding));
    if let Some((coding, sibling)) = chosen {
        match open_sibling(site, root, sibling) {
            Ok((file, meta)) => return Ok(opened(file, &meta, name, Some(*coding), true)),
            Err(e) => tracing::warn!("precompressed file not served: {e}"),
        }
    }
    Ok(opened(file, &meta, name, None, varies))
}

fn opened(
    file: File,
    meta: &Metadata,
    name: PathBuf,
    encoding: Option<Compression>,
    varies: bool,
) -> Opened {
    Opened {
        file,
        len: meta.len(),
        modified: meta.modified().unwrap_or(UNIX_EPOCH),
        name,
        encoding,
        varies,
    }
}

/// `file.br` and `file.gz` that are regular files at least as recent as `file`: a
/// sibling older than its original is left over from a previous build, and serving it
/// would hand out stale content to exactly the clients that accept compression.
fn fresh_siblings(name: &Path, modified: SystemTime) -> Vec<(Compression, PathBuf)> {
    [Compression::Brotli, Compression::Gzip]
        .into_iter()
        .filter_map(|coding| {
            let mut sibling = name.as_os_str().to_owned();
            sibling.push(coding.suffix());
            let sibling = PathBuf::from(sibling);
            let meta = fs::metadata(&sibling).ok()?;
            let fresh = meta.is_file() && meta.modified().is_ok_and(|m| m >= modified);
            fresh.then_some((coding, sibling))
        })
        .collect()
}

fn open_sibling(
    site: &StaticConfig,
    root: &Path,
    sibling: &Path,
) -> Result<(File, Metadata), LookupError> {
    let real = confine(site, root, sibling)?;
    open_regular(&real)
}

/// The real path of `path`, which must lie under the real path of `root` unless the
/// site allows symbolic links out. Checked on the fully resolved path, so a link
/// anywhere along the way (a linked directory included) is caught.
fn confine(site: &StaticConfig, root: &Path, path: &Path) -> Result<PathBuf, LookupError> {
    if site.allow_symlinks_outside {
        return Ok(path.to_path_buf());
    }
    let real_root = fs::canonicalize(root).map_err(|e| LookupError::from_io(root, e))?;
    let real = fs::canonicalize(path).map_err(|e| LookupError::from_io(path, e))?;
    if real.starts_with(&real_root) {
        Ok(real)
    } else {
        Err(LookupError::OutsideRoot {
            path: path.to_path_buf(),
            root: root.to_path_buf(),
        })
    }
}

/// Opens the resolved path and checks, on the open file, that it is a regular file:
/// what is sent is what was checked, even if the name changes meanwhile.
fn open_regular(path: &Path) -> Result<(File, Metadata), LookupError> {
    let file = File::open(path).map_err(|e| LookupError::from_io(path, e))?;
    let meta = file.metadata().map_err(|e| LookupError::from_io(path, e))?;
    if !meta.is_file() {
        return Err(LookupError::NotFound);
    }
    Ok((file, meta))
}
