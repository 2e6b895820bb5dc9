//! Several processes training one model, on PyTorch's own distributed engine (c10d) through
//! src/shim/dist.cpp: the job's shape from torchrun's environment variables, a Gloo process group
//! with its collectives, and c10d's Reducer (DDP's gradient bucketing during backward).

#[cfg_attr(not(trainer_dist), allow(unused_imports))]
use std::ffi::{c_char, c_int, CStr, CString};

use anyhow::{bail, Context, Result};
use tch::Tensor;

/// One rank's place in a job, as torchrun (and `trainer fit --nproc-per-node`) set it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub local_world: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl Job {
    /// The job of this process from `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
    /// `MASTER_ADDR` and `MASTER_PORT`; none when `WORLD_SIZE` is unset. A variable that is set
    /// but wrong is an error naming it.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<Job>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let number = |name: &str, text: Option<String>| -> Result<usize> {
            let text = text.with_context(|| format!("WORLD_SIZE is set but {name} is not"))?;
            text.trim()
                .parse()
                .with_context(|| format!("{name}={text} is not a whole number"))
        };
        let world = number("WORLD_SIZE", Some(world))?;
        let rank = number("RANK", get("RANK"))?;
        let local_rank = match get("LOCAL_RANK") {
            Some(t) => number("LOCAL_RANK", Some(t))?,
            None => rank,
        };
        let local_world = match get("LOCAL_WORLD_SIZE") {
            Some(t) => number("LOCAL_WORLD_SIZE", Some(t))?,
            None => world,
        };
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = get("MASTER_PORT").unwrap_or_else(|| "29500".into());
        let master_port: u16 = port
            .trim()
            .parse()
            .ok()
            .filter(|&p| p > 0)
            .with_context(|| format!("MASTER_PORT={port} is not a port number"))?;
        if world == 0 || rank >= world || local_rank >= local_world.max(1) {
            bail!("RANK={rank}, LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world}, LOCAL_WORLD_SIZE={local_world}");
        }
        Ok(Some(Job {
            rank,
            world,
            local_rank,
            local_world,
            master_addr,
            master_port,
        }))
    }
}

#[cfg_attr(not(trainer_dist), allow(dead_code))]
type CTensorPtr = *mut torch_sys::C_tensor;

#[cfg(trainer_dist)]
extern "C" {
    fn trainer_dist_init(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_s: c_int,
        iface: *const c_char,
        cuda: c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> *mut std::ffi::c_void;
    fn trainer_dist_has_nccl() -> c_int;
    fn trainer_dist_free(group: *mut std::ffi::c_void);
    fn trainer_dist_allreduce_sum(
        group: *mut std::ffi::c_void,
        t: CTensorPtr,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn trainer_dist_broadcast(
        group: *mut std::ffi::c_void,
        t: CTensorPtr,
        root: c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn trainer_reducer_new(
        group: *mut std::ffi::c_void,
        params: *const CTensorPtr,
        n: c_int,
        bucket_bytes: i64,
        err: *mut c_char,
        errlen: c_int,
    ) -> *mut std::ffi::c_void;
    fn trainer_reducer_prepare(r: *mut std::ffi::c_void, err: *mut c_char, errlen: c_int) -> c_int;
    fn trainer_reducer_free(r: *mut std::ffi::c_void);
}

/// A free TCP port on the loopback interface, for the rendezvous.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free port on 127.0.0.1 for the ranks' rendezvous")?;
    Ok(listener.local_addr()?.port())
}

/// Whether this build has the distributed engine (gloo's headers were there).
pub const ENGINE: bool = cfg!(trainer_dist);

/// Why a build without gloo's headers cannot train on several ranks.
#[cfg_attr(trainer_dist, allow(dead_code))]
const NO_ENGINE: &str = "this trainer was built without the distributed engine (gloo's headers were missing): apt install libgloo-dev, then rebuild";

/// In a build without the engine no group can exist; this only names the arguments.
#[cfg(not(trainer_dist))]
fn no_engine<T>(_args: T) -> Result<(), String> {
    Err(NO_ENGINE.into())
}

#[cfg_attr(not(trainer_dist), allow(dead_code))]
/// Calls `f` with an error buffer; its text when `f` reports failure.
fn with_error(f: impl FnOnce(*mut c_char, c_int) -> bool) -> Result<(), String> {
    let mut buf = vec![0 as c_char; 4096];
    if f(buf.as_mut_ptr(), buf.len() as c_int) {
        return Ok(());
    }
    // SAFETY: the shim wrote a NUL-terminated string into the buffer (or left it zeroed).
    let text = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Err(text
        .to_string_lossy()
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

#[cfg_attr(not(trainer_dist), allow(dead_code))]
fn ptr(t: &Tensor) -> CTensorPtr {
    t.as_ptr() as CTensorPtr
}

/// A Gloo process group of the job's ranks.
pub struct Group {
    raw: *mut std::ffi::c_void,
    pub job: Job,
}

impl Group {
    /// Joins the job (rank 0 serves the rendezvous at MASTER_ADDR:MASTER_PORT, listening only
    /// on that address where it is this machine's: loopback alone for a job on one machine);
    /// waits up to `timeout_s` for the others, and as long in every collective afterwards.
    #[cfg(trainer_dist)]
    pub fn join(job: &Job, timeout_s: u32, cuda: bool) -> Result<Group> {
        let host = CString::new(job.master_addr.clone()).context("MASTER_ADDR")?;
        let iface = CString::new(std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default())
            .context("GLOO_SOCKET_IFNAME")?;
        let mut raw = std::ptr::null_mut();
        with_error(|err, len| {
            // SAFETY: the strings outlive the call; the shim returns an owned pointer or null.
            raw = unsafe {
                trainer_dist_init(
                    host.as_ptr(),
                    job.master_port as c_int,
                    job.rank as c_int,
                    job.world as c_int,
                    timeout_s as c_int,
                    iface.as_ptr(),
                    cuda as c_int,
                    err,
                    len,
                )
            };
            !raw.is_null()
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "rank {}: cannot join the job at {}:{}: {e}",
                job.rank,
                job.master_addr,
                job.master_port
            )
        })?;
        Ok(Group {
            raw,
            job: job.clone(),
        })
    }

    #[cfg(not(trainer_dist))]
    pub fn join(_job: &Job, _timeout_s: u32, _cuda: bool) -> Result<Group> {
        bail!("{NO_ENGINE}")
    }

    /// The backend of CUDA tensors in this build: "nccl", or "gloo" where NCCL was not built.
    pub fn cuda_backend() -> &'static str {
        #[cfg(trainer_dist)]
        // SAFETY: a constant query.
        if unsafe { trainer_dist_has_nccl() } == 1 {
            return "nccl";
        }
        "gloo"
    }

    fn check(&self, what: &str, result: Result<(), String>) -> Result<()> {
        result.map_err(|e| {
            anyhow::anyhow!(
                "rank {}: {what} across ranks failed (did another rank stop?): {e}",
                self.job.rank
            )
        })
    }

    /// `t` = the sum of every rank's `t` (contiguous, in place).
    pub fn allreduce_sum(&self, t: &Tensor) -> Result<()> {
        #[cfg(trainer_dist)]
        let r = with_error(|err, len| {
            // SAFETY: `t` is a live tensor; the group pointer is owned by self.
            unsafe { trainer_dist_allreduce_sum(self.raw, ptr(t), err, len) == 0 }
        });
        #[cfg(not(trainer_dist))]
        let r = no_engine(t);
        self.check("a sum", r)
    }

    /// `t` = rank `root`'s `t` (contiguous, in place).
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        #[cfg(trainer_dist)]
        let r = with_error(|err, len| {
            // SAFETY: as in allreduce_sum.
            unsafe { trainer_dist_broadcast(self.raw, ptr(t), root as c_int, err, len) == 0 }
        });
        #[cfg(not(trainer_dist))]
        let r = no_engine((t, root));
        self.check("a broadcast", r)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        #[cfg(trainer_dist)]
        // SAFETY: the pointer came from trainer_dist_init and is freed once.
        unsafe {
            trainer_dist_free(self.raw)
        }
    }
}

/// c10d's Reducer over the trainable parameters: after `prepare`, the next backward pass
/// averages their gradients across ranks, bucket by bucket while it runs.
pub struct Reducer {
    raw: *mut std::ffi::c_void,
    rank: usize,
}

/// Bucket size of the gradient all-reduce (DDP's default).
pub const BUCKET_BYTES: i64 = 25 * 1024 * 1024;

impl Reducer {
    pub fn new(group: &Group, params: &[Tensor]) -> Result<Reducer> {
        #[cfg(trainer_dist)]
        {
            let ptrs: Vec<CTensorPtr> = params.iter().map(ptr).collect();
            let mut raw = std::ptr::null_mut();
            with_error(|err, len| {
                // SAFETY: the tensors are live; the shim copies the handles it keeps.
                raw = unsafe {
                    trainer_reducer_new(
                        group.raw,
                        ptrs.as_ptr(),
                        ptrs.len() as c_int,
                        BUCKET_BYTES,
                        err,
                        len,
                    )
                };
                !raw.is_null()
            })
            .map_err(|e| anyhow::anyhow!("rank {}: gradient reducer: {e}", group.job.rank))?;
            Ok(Reducer {
                raw,
                rank: group.job.rank,
            })
        }
        #[cfg(not(trainer_dist))]
        {
            let _ = params;
            bail!("rank {}: {NO_ENGINE}", group.job.rank)
        }
    }

    /// Arms the gradient hooks for the next backward pass.
    pub fn prepare(&self) -> Result<()> {
        #[cfg(trainer_dist)]
        let r = with_error(|err, len| {
            // SAFETY: the reducer pointer is owned by self.
            unsafe { trainer_reducer_prepare(self.raw, err, len) == 0 }
        });
        #[cfg(not(trainer_dist))]
        let r: Result<(), String> = Ok(());
        r.map_err(|e| anyhow::anyhow!("rank {}: gradient reducer: {e}", self.rank))
    }
}

impl Drop for Reducer {
    fn drop(&mut self) {
        #[cfg(trainer_dist)]
        // SAFETY: the pointer came from trainer_reducer_new and is freed once.
        unsafe {
            trainer_reducer_free(self.raw)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn torchrun_variables_make_a_job() {
        assert_eq!(Job::from_env(env(&[])).unwrap(), None);
        let job = Job::from_env(env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (job.rank, job.world, job.local_rank, job.local_world),
            (3, 4, 1, 2)
        );
        assert_eq!(
            (job.master_addr.as_str(), job.master_port),
            ("node0", 29400)
        );
    }

    #[test]
    fn a_one_rank_group_sums_and_reduces_gradients() {
        let job = Job {
            rank: 0,
            world: 1,
            local_rank: 0,
            local_world: 1,
            master_addr: "127.0.0.1".into(),
            master_port: free_port().unwrap(),
        };
        let group = Group::join(&job, 30, false).unwrap();
        let t = Tensor::from_slice(&[1.0f32, 2.0]);
        group.allreduce_sum(&t).unwrap();
        group.broadcast(&t, 0).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [1.0, 2.0]);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let lin = tch::nn::linear(vs.root() / "l", 3, 2, Default::default());
        let params: Vec<Tensor> = vs.trainable_variables();
        let reducer = Reducer::new(&group, &params).unwrap();
        for _ in 0..2 {
            for p in &params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            reducer.prepare().unwrap();
            let x = Tensor::ones([4, 3], (tch::Kind::Float, tch::Device::Cpu));
            tch::nn::Module::forward(&lin, &x).sum(None).backward();
        }
        // d(sum)/d(bias) = 4 per output, averaged over one rank.
        let g = vs.variables()["l.bias"].grad();
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), [4.0, 4.0]);
    }

    /// The local addresses (hex, as /proc/net/tcp writes them) listening on `port`.
    fn listening_on(port: u16) -> Vec<String> {
        let port = format!(":{port:04X}");
        ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|t| t.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 3 && f[3] == "0A" && f[1].ends_with(&port)).then(|| f[1].to_owned())
            })
            .collect()
    }

    #[test]
    fn a_local_rendezvous_listens_on_loopback_only() {
        let port = free_port().unwrap();
        let job = Job {
            rank: 0,
            world: 1,
            local_rank: 0,
            local_world: 1,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        };
        let group = Group::join(&job, 30, false).unwrap();
        let addrs = listening_on(port);
        let loopback = format!("0100007F:{port:04X}");
        assert!(!addrs.is_empty(), "nothing listens on {port}");
        assert!(addrs.iter().all(|a| *a == loopback), "{addrs:?}");
        drop(group);
    }

    #[test]
    fn a_multi_node_rendezvous_listens_on_master_addr_only() {
        // This machine's address toward other hosts, if it has one besides loopback.
        let Some(ip) = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
            .and_then(|s| s.local_addr())
            .ok()
            .and_then(|a| match a.ip() {
                std::net::IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_unspecified() => Some(v4),
                _ => None,
            })
        else {
            return;
        };
        let port = free_port().unwrap();
        let job = Job {
            rank: 0,
            world: 1,
            local_rank: 0,
            local_world: 1,
            master_addr: ip.to_string(),
            master_port: port,
        };
        let group = Group::join(&job, 30, false).unwrap();
        let hex = format!("{:08X}:{port:04X}", u32::from_le_bytes(ip.octets()));
        assert_eq!(listening_on(port), [hex]);
        drop(group);
    }

    #[test]
    fn wrong_variables_are_named() {
        let err = |vars: &[(&str, &str)]| Job::from_env(env(vars)).unwrap_err().to_string();
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK"));
        assert!(err(&[("WORLD_SIZE", "two"), ("RANK", "0")]).contains("WORLD_SIZE=two"));
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "2")]).contains("do not fit"));
        assert!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "x")])
                .contains("MASTER_PORT=x")
        );
    }
}
