//! Replays kernel launches on the host: a script of buffers and launches is written for
//! `launch_driver.cpp` (every kernel family compiled with g++ under kernels/emulate.h),
//! which runs them in order and writes the buffers back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The driver, compiled once per test binary; `None` (with the reason printed) when g++
/// cannot be run, a failure under `CI=true`.
pub fn driver() -> Option<&'static Path> {
    static DRIVER: OnceLock<Option<PathBuf>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("launch_driver");
            let built = Command::new("g++")
                .args(["-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-I"])
                .arg(root.join("../../kernels"))
                .arg("-o")
                .arg(&exe)
                .arg(root.join("tests/emulate/launch_driver.cpp"))
                .output();
            match built {
                Ok(o) if o.status.success() => Some(exe),
                Ok(o) => panic!("the emulated kernels do not compile:\n{}", String::from_utf8_lossy(&o.stderr)),
                Err(e) => {
                    if std::env::var("CI").is_ok_and(|v| v == "true") {
                        panic!("CI=true and g++ cannot be run: {e}");
                    }
                    let _ = writeln!(std::io::stderr(), "SKIP emulated kernels: g++ cannot be run ({e})");
                    None
                }
            }
        })
        .as_deref()
}

/// A kernel argument.
pub enum Arg {
    /// A buffer, by the index [`Script`] gave it.
    Buf(usize),
    /// A null pointer (absent optional input).
    Null,
    /// A value passed by value: its bytes.
    Val(Vec<u8>),
}

/// A kernel parameter block of the ABI, by value.
pub fn param<P: bytemuck::Pod>(p: &P) -> Arg {
    Arg::Val(bytemuck::bytes_of(p).to_vec())
}

/// Buffers and launches to replay.
#[derive(Default)]
pub struct Script {
    buffers: Vec<Vec<u8>>,
    launches: Vec<u8>,
    count: u32,
}

impl Script {
    fn buf(&mut self, bytes: Vec<u8>) -> usize {
        self.buffers.push(bytes);
        self.buffers.len() - 1
    }

    /// An f32 buffer.
    pub fn f32s(&mut self, v: &[f32]) -> usize {
        self.buf(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// An i32 buffer.
    pub fn i32s(&mut self, v: &[i32]) -> usize {
        self.buf(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// A buffer of 16-bit patterns.
    pub fn u16s(&mut self, v: &[u16]) -> usize {
        self.buf(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// `n` zeroed 4-byte elements.
    pub fn zeros(&mut self, n: usize) -> usize {
        self.buf(vec![0; 4 * n])
    }

    /// Appends a launch of `name` with the backend's geometry.
    pub fn launch(&mut self, name: &str, geometry: moe_cuda::launch::Launch, args: &[Arg]) {
        let (grid, block) = (geometry.grid, geometry.block);
        let l = &mut self.launches;
        l.extend((name.len() as u32).to_le_bytes());
        l.extend(name.as_bytes());
        for v in grid.iter().chain(&block) {
            l.extend(v.to_le_bytes());
        }
        l.extend((args.len() as u32).to_le_bytes());
        for a in args {
            match a {
                Arg::Buf(i) => {
                    l.extend(0u32.to_le_bytes());
                    l.extend((*i as u32).to_le_bytes());
                }
                Arg::Null => l.extend(1u32.to_le_bytes()),
                Arg::Val(b) => {
                    l.extend(2u32.to_le_bytes());
                    l.extend((b.len() as u32).to_le_bytes());
                    l.extend(b);
                }
            }
        }
        self.count += 1;
    }

    /// Runs the launches in order; the buffers afterwards.
    pub fn run(self, exe: &Path, name: &str) -> Buffers {
        let mut s = Vec::new();
        s.extend((self.buffers.len() as u32).to_le_bytes());
        let sizes: Vec<usize> = self.buffers.iter().map(Vec::len).collect();
        for b in &self.buffers {
            s.extend((b.len() as u64).to_le_bytes());
            s.extend(b);
        }
        s.extend(self.count.to_le_bytes());
        s.extend(&self.launches);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let (inp, outp) = (dir.join(format!("{name}.script")), dir.join(format!("{name}.out")));
        std::fs::write(&inp, s).expect("write the script");
        let run = Command::new(exe).arg(&inp).arg(&outp).output().expect("run the driver");
        assert!(run.status.success(), "{name}: driver failed: {}", String::from_utf8_lossy(&run.stderr));
        let all = std::fs::read(&outp).expect("read the buffers");
        let mut at = 0;
        let buffers = sizes
            .iter()
            .map(|&n| {
                at += n;
                all[at - n..at].to_vec()
            })
            .collect();
        Buffers(buffers)
    }
}

/// The buffers after a run.
pub struct Buffers(Vec<Vec<u8>>);

impl Buffers {
    /// Buffer `i` as f32 values.
    pub fn f32s(&self, i: usize) -> Vec<f32> {
        self.0[i].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    /// Buffer `i` as i32 values.
    pub fn i32s(&self, i: usize) -> Vec<i32> {
        self.0[i].chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
}
