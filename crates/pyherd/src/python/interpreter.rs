//! Finding the interpreter once: a name is looked up on `PATH`; a launcher script
//! (a pyenv shim adds ~60 ms to every start) is asked for its real `sys.executable`.
//! Symlinks are kept as they are: a virtual environment is recognised by its path.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, ErrorKind};

/// The interpreter to execute for `python` (a name or a path).
///
/// # Errors
/// `initialization/spawn_failed` when it is not found, not executable, or its launcher fails.
pub(crate) async fn resolve(python: &Path, timeout: Duration) -> Result<PathBuf, Error> {
    let found = find(python, std::env::var_os("PATH").as_deref()).ok_or_else(|| {
        Error::new(
            ErrorKind::SpawnFailed,
            format!(
                "python interpreter {} not found (set `python` to its path)",
                python.display()
            ),
        )
    })?;
    if !is_script(&found) {
        return Ok(found);
    }
    let output = tokio::time::timeout(
        timeout,
        tokio::process::Command::new(&found)
            .args(["-c", "import sys; sys.stdout.write(sys.executable)"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let failed = |why: String| {
        Error::new(
            ErrorKind::SpawnFailed,
            format!("python launcher {} failed: {why}", found.display()),
        )
    };
    let output = match output {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(failed(e.to_string())),
        Err(_) => return Err(failed(format!("no answer within {timeout:?}"))),
    };
    if !output.status.success() {
        return Err(failed(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let real = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    Ok(if real.is_absolute() { real } else { found })
}

/// The interpreter `python` names, as an absolute path: a relative one is taken from the
/// host's working directory, not the workers' (`working_dir`), where it is started.
fn find(python: &Path, path_var: Option<&OsStr>) -> Option<PathBuf> {
    let found = if python.components().count() > 1 || python.is_absolute() {
        is_executable(python).then(|| python.to_path_buf())
    } else {
        std::env::split_paths(path_var?)
            .map(|dir| dir.join(python))
            .find(|candidate| is_executable(candidate))
    };
    std::path::absolute(found?).ok()
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn is_script(path: &Path) -> bool {
    let mut magic = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == b"#!")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_looked_up_on_path_and_paths_are_kept() {
        let dir = std::env::temp_dir().join(format!("pyherd-interp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("fakepython");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path_var = std::env::join_paths([Path::new("/nonexistent"), &dir]).unwrap();
        assert_eq!(
            find(Path::new("fakepython"), Some(&path_var)),
            Some(exe.clone())
        );
        assert_eq!(find(Path::new("missing-python"), Some(&path_var)), None);
        assert_eq!(find(&exe, None), Some(exe.clone()));
        assert!(is_script(&exe));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_missing_interpreter_is_a_spawn_failure() {
        let e = resolve(Path::new("/nonexistent/python3"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::SpawnFailed);
        assert!(e.message().contains("/nonexistent/python3"));
    }
}
