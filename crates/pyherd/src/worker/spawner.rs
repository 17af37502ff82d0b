//! Every worker process is forked from one long-lived thread per pool.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
//! process: forking from tokio's workers or blocking pool (whose threads come and go)
//! would kill healthy workers at random. This thread lives exactly as long as the pool
//! (it ends when the last [`Spawner`] handle is dropped), so a dropped or crashed host
//! takes its workers with it.

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::mpsc;

use tokio::process::{Child, Command};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The fd on which a worker reads calls.
pub(crate) const REQUEST_FD: RawFd = 3;
/// The fd on which a worker writes replies.
pub(crate) const REPLY_FD: RawFd = 4;

struct SpawnRequest {
    command: Command,
    /// The child's ends of its pipes: kept open until the fork is done, then closed here.
    child_fds: [OwnedFd; 2],
    reply: oneshot::Sender<io::Result<Child>>,
}

/// A handle to the pool's spawner thread.
#[derive(Clone)]
pub(crate) struct Spawner {
    requests: mpsc::Sender<SpawnRequest>,
}

impl Spawner {
    /// Starts the thread; children are registered with `runtime`'s process driver.
    pub(crate) fn start(runtime: Handle) -> io::Result<Self> {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("pyherd-spawner".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                for mut request in incoming {
                    let child = request.command.spawn();
                    drop(request.child_fds);
                    let _ = request.reply.send(child);
                }
            })?;
        Ok(Self { requests })
    }

    /// Spawns `command` with `request_fd` as the child's fd 3 and `reply_fd` as its fd 4,
    /// fd 1 pointed at fd 2, in its own process group, with SIGKILL as parent-death signal.
    pub(crate) async fn spawn(
        &self,
        mut command: Command,
        request_fd: OwnedFd,
        reply_fd: OwnedFd,
    ) -> io::Result<Child> {
        use std::os::fd::AsRawFd;
        // Duplicate above the target numbers so the dup2 calls cannot overwrite each other.
        let request_fd = dup_above(&request_fd, 10)?;
        let reply_fd = dup_above(&reply_fd, 10)?;
        command.process_group(0);
        set_child_fds(&mut command, request_fd.as_raw_fd(), reply_fd.as_raw_fd());
        let (reply, answer) = oneshot::channel();
        let gone = || io::Error::other("the pool's spawner thread has stopped");
        self.requests
            .send(SpawnRequest {
                command,
                child_fds: [request_fd, reply_fd],
                reply,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

fn dup_above(fd: &OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, fcntl};
    Ok(own(fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(min))?))
}

#[allow(unsafe_code)]
fn own(fd: RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was just returned by F_DUPFD_CLOEXEC and is owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The audited `pre_exec` hook.
#[allow(unsafe_code)]
fn set_child_fds(command: &mut Command, request_fd: RawFd, reply_fd: RawFd) {
    use nix::libc;
    let host = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec. It calls only
    // async-signal-safe functions (dup2, prctl, getppid), takes no locks and does not
    // allocate (errors come from errno). The source fds are above 9, so dup2 onto 3, 4
    // and 1 cannot clobber them; the new fds do not have FD_CLOEXEC.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(request_fd, REQUEST_FD) < 0
                || libc::dup2(reply_fd, REPLY_FD) < 0
                || libc::dup2(2, 1) < 0
                || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0
            {
                return Err(io::Error::last_os_error());
            }
            // The host may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != host {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::time::Duration;

    use nix::libc;
    use nix::unistd::{Pid, getpgid};

    use super::*;

    /// The parent-death signal on its own (no guardian, no Python watchdog: the child is
    /// `sleep`): the child leads its own process group and is SIGKILLed when the thread
    /// that forked it ends, as it does when the host process dies.
    #[tokio::test]
    async fn a_child_dies_when_the_spawner_thread_ends() {
        let spawner = Spawner::start(Handle::current()).unwrap();
        let (requests, replies) = nix::unistd::pipe().unwrap();
        let mut command = Command::new("sleep");
        command.arg("60");
        let mut child = spawner.spawn(command, requests, replies).await.unwrap();
        let pid = Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
        assert_eq!(getpgid(Some(pid)).unwrap(), pid, "its own process group");
        assert!(
            child.try_wait().unwrap().is_none(),
            "alive while the thread runs"
        );
        drop(spawner);
        let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .expect("the child outlived the spawner thread")
            .unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
