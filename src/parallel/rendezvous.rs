//! Rendezvous for multi-process groups launched torchrun-style: rank 0 listens on
//! `MASTER_ADDR:MASTER_PORT` and hands every other rank a 128-byte token (NCCL's unique
//! id); the others connect, retrying until the timeout.

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The launch environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (the GPU on this node),
/// `MASTER_ADDR`, `MASTER_PORT`, as torchrun and DeepSpeed's launcher set them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Global rank.
    pub rank: usize,
    /// Ranks in the job.
    pub world_size: usize,
    /// Rank within the node (the device ordinal).
    pub local_rank: usize,
    /// `host:port` of rank 0's rendezvous.
    pub master: String,
}

impl LaunchEnv {
    /// Reads the variables; a missing or malformed one is a config error naming it.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).map_err(|_| Error::config(k, "not set (launch with torchrun or set it)"));
        let num = |k: &str| -> Result<usize> { var(k)?.parse().map_err(|_| Error::config(k, "not a number")) };
        let rank = num("RANK")?;
        let world_size = num("WORLD_SIZE")?;
        let local_rank = std::env::var("LOCAL_RANK").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        if rank >= world_size {
            return Err(Error::config("RANK", format!("{rank} is not below WORLD_SIZE {world_size}")));
        }
        Ok(LaunchEnv {
            rank,
            world_size,
            local_rank,
            master: format!("{}:{}", var("MASTER_ADDR")?, num("MASTER_PORT")?),
        })
    }
}

/// Rank 0 sends `token` to every other rank; every rank returns the token. Fails with a
/// communication error when a peer does not show up within `timeout`.
pub fn share_token(env: &LaunchEnv, token: Option<[u8; 128]>, timeout: Duration) -> Result<[u8; 128]> {
    let fail = |msg: String| Error::Communication { rank: env.rank, msg };
    let deadline = super::comm::deadline_after(timeout);
    if env.rank == 0 {
        let token = token.ok_or_else(|| fail("rank 0 has no token to share".into()))?;
        let listener = TcpListener::bind(&env.master).map_err(|e| fail(format!("listen on {}: {e}", env.master)))?;
        listener.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
        let mut served = 0;
        while served + 1 < env.world_size {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).map_err(|e| fail(e.to_string()))?;
                    s.write_all(&token).map_err(|e| fail(format!("sending the token: {e}")))?;
                    served += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(fail(format!(
                            "{} of {} ranks connected to {} within {timeout:?}",
                            served + 1,
                            env.world_size,
                            env.master
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(fail(format!("accept: {e}"))),
            }
        }
        Ok(token)
    } else {
        loop {
            match TcpStream::connect(&env.master) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(
                        deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
                    ))
                    .map_err(|e| fail(e.to_string()))?;
                    let mut t = [0u8; 128];
                    s.read_exact(&mut t).map_err(|e| fail(format!("reading the token from rank 0: {e}")))?;
                    return Ok(t);
                }
                Err(e) => {
                    if Instant::now() > deadline {
                        return Err(fail(format!("rank 0 at {} did not answer within {timeout:?}: {e}", env.master)));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(rank: usize, world: usize, port: u16) -> LaunchEnv {
        LaunchEnv { rank, world_size: world, local_rank: rank, master: format!("127.0.0.1:{port}") }
    }

    #[test]
    fn every_rank_gets_rank_zeros_token() {
        let port = 29_500 + (std::process::id() % 1000) as u16;
        let token = [7u8; 128];
        let got: Vec<[u8; 128]> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|r| {
                    s.spawn(move || share_token(&env(r, 4, port), (r == 0).then_some(token), Duration::from_secs(10)))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        assert!(got.iter().all(|t| *t == token));
    }

    #[test]
    fn a_missing_peer_is_an_error_after_the_timeout() {
        let port = 30_600 + (std::process::id() % 1000) as u16;
        let err = share_token(&env(0, 3, port), Some([1; 128]), Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("1 of 3 ranks"), "{err}");
        let err = share_token(&env(2, 3, port + 1), None, Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("did not answer"), "{err}");
    }
}
