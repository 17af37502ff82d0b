//! The `pyherd_worker` package ships inside the binary and is written once per content
//! hash to the cache directory, so a machine needs nothing but `python3`.

use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind};

macro_rules! embed {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../../../python/pyherd_worker/", $name)))),*]
    };
}

/// (file name, contents) of every module of the package.
const FILES: &[(&str, &str)] = embed!(
    "__init__.py",
    "__main__.py",
    "dspy_adapter.py",
    "guardian.py",
    "handlers.py",
    "logs.py",
    "options.py",
    "protocol.py",
    "runtime.py",
    "testing.py",
    "zygote.py",
);

fn content_hash() -> u64 {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, text) in FILES {
        for byte in name.bytes().chain([0]).chain(text.bytes()).chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The default cache directory (see [`PoolConfig::cache_dir`](crate::PoolConfig::cache_dir)).
fn default_cache_dir() -> PathBuf {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("PYHERD_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("pyherd")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("pyherd")))
        .unwrap_or_else(|| std::env::temp_dir().join("pyherd"))
}

/// Writes the package (if this version is not there yet) and returns the directory to
/// put on `PYTHONPATH`.
///
/// # Errors
/// `initialization/spawn_failed` when the directory cannot be written.
pub(crate) fn install(cache_dir: Option<&Path>) -> Result<PathBuf, Error> {
    let root = cache_dir.map_or_else(default_cache_dir, Path::to_path_buf);
    // Absolute: the workers find the package from their own working directory.
    let root = std::path::absolute(&root).map_err(|e| {
        Error::new(
            ErrorKind::SpawnFailed,
            format!("cannot resolve the cache directory {}: {e}", root.display()),
        )
    })?;
    let target = root.join(format!("worker-{:016x}", content_hash()));
    if target.join("pyherd_worker").join("__main__.py").is_file() {
        return Ok(target);
    }
    let failed = |what: &str, path: &Path, e: std::io::Error| {
        Error::new(
            ErrorKind::SpawnFailed,
            format!("cannot {what} {}: {e}", path.display()),
        )
    };
    let staging = root.join(format!(
        ".staging-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let package = staging.join("pyherd_worker");
    std::fs::create_dir_all(&package).map_err(|e| failed("create", &package, e))?;
    for (name, text) in FILES {
        let path = package.join(name);
        std::fs::write(&path, text).map_err(|e| failed("write", &path, e))?;
    }
    match std::fs::rename(&staging, &target) {
        Ok(()) => Ok(target),
        // Another process installed the same version first: use theirs.
        Err(_) if target.join("pyherd_worker").join("__main__.py").is_file() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(target)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(failed("install the worker package into", &target, e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_once_per_version_and_reuses_it() {
        let root = std::env::temp_dir().join(format!("pyherd-pkg-{}", std::process::id()));
        let first = install(Some(&root)).unwrap();
        let main = first.join("pyherd_worker").join("__main__.py");
        assert!(main.is_file());
        let second = install(Some(&root)).unwrap();
        assert_eq!(first, second);
        let written = std::fs::read_to_string(first.join("pyherd_worker/runtime.py")).unwrap();
        assert!(written.contains("def main("));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_unwritable_cache_is_a_typed_error() {
        let e = install(Some(Path::new("/proc/pyherd-cannot-write-here"))).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::SpawnFailed);
    }
}
