//! CUDA graphs of the training step (`fit --cuda-graphs on`): a full batch's step (the gather from
//! the image cache on the device, augmentation, forward, loss, backward and Adam's update) runs
//! eagerly for a few warm-up steps on the graph's own stream, is then recorded once and replayed
//! from then on: one launch instead of a few thousand kernel launches from the host. The step
//! reads its inputs from buffers at fixed addresses ([`super::step::StaticInputs`]) and Adam's step
//! count and learning rate from the device ([`super::adam::Kernel::Capturable`]); it writes its
//! loss into a buffer of its own. The last partial batch and a frozen backbone's epochs run
//! eagerly. [`Recorded`] is the warm-up, capture and replay that the training step
//! ([`StepGraph`]) and validation's forward pass (`validate::EvalGraph`) share. The C++ side is
//! src/shim/graph.cpp.

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::adam::Adam;
use super::settings::FitSettings;
use crate::model::precision::Precision;

/// Eager steps on the graph's stream before the capture (cuDNN's benchmark picks its kernels, the
/// allocator and the libraries set up their workspaces).
pub const WARMUP: usize = 3;

/// Whether this build has CUDA graphs (the shim's graph.cpp, built with the CUDA headers).
pub const BUILT: bool = cfg!(trainer_graphs);

/// What a build needs to have them.
pub const NEEDS: &str = "a torch wheel with CUDA and the CUDA headers scripts/setup installs";

/// Why `--cuda-graphs on` cannot apply to this run, if it cannot (`world`: ranks).
pub fn refusal(settings: &FitSettings, device: Device, world: usize) -> Option<String> {
    if !BUILT {
        return Some(format!(
            "--cuda-graphs on: this trainer was built without CUDA graphs (it needs {NEEDS})"
        ));
    }
    if !device.is_cuda() {
        return Some(format!(
            "--cuda-graphs on needs a CUDA device (this run trains on {})",
            crate::device::describe(device)
        ));
    }
    if settings.precision == Precision::Fp16 {
        return Some("--cuda-graphs on with --precision fp16 is not supported (its loss scaler decides each step on the host); use bf16 or fp32".into());
    }
    if world * settings.accumulate > 1 {
        return Some("--cuda-graphs on with several ranks or --accumulate is not supported (the gradient exchange runs outside the graph)".into());
    }
    None
}

enum Phase {
    /// Eager runs on the graph's stream so far.
    Warmup(usize),
    Replay,
}

/// What a [`Recorded::run`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ran {
    /// The body ran on the host: eagerly, or recorded and then replayed once.
    Body,
    /// Only the graph's replay ran (the body's host side did not).
    Replay,
}

/// Work recorded in a CUDA graph after `warmup` eager runs on the graph's stream, then replayed.
pub struct Recorded {
    graph: Graph,
    warmup: usize,
    phase: Phase,
}

impl Recorded {
    pub fn new(device: Device, warmup: usize) -> Result<Recorded> {
        let index = match device {
            Device::Cuda(i) => i,
            _ => anyhow::bail!("CUDA graphs need a CUDA device"),
        };
        Ok(Recorded {
            graph: Graph::new(index)?,
            warmup,
            phase: Phase::Warmup(0),
        })
    }

    /// Runs `body`, which must read and write only tensors at fixed addresses (filled before, read
    /// after): eagerly on the graph's stream for the warm-up runs, recorded at the next (then
    /// replayed once, so its work is done), replayed from then on.
    pub fn run(&mut self, body: impl FnOnce() -> Result<()>) -> Result<Ran> {
        let n = match self.phase {
            Phase::Replay => {
                self.graph.replay()?;
                return Ok(Ran::Replay);
            }
            Phase::Warmup(n) => n,
        };
        let capture = n == self.warmup;
        self.graph.enter()?;
        let ran = self.on_stream(body, capture);
        self.graph.exit()?;
        ran?;
        self.phase = match capture {
            true => {
                self.graph.replay()?;
                Phase::Replay
            }
            false => Phase::Warmup(n + 1),
        };
        Ok(Ran::Body)
    }

    /// `body` on the graph's stream (made current by the caller), recorded if `capture`. A
    /// capture is ended even when `body` failed, so the stream leaves capture mode.
    fn on_stream(&self, body: impl FnOnce() -> Result<()>, capture: bool) -> Result<()> {
        if capture {
            self.graph.begin()?;
        }
        // A failed op of tch's panics: caught, so the capture still ends and the stream is left.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body))
            .unwrap_or_else(|panic| Err(anyhow::anyhow!("{}", panic_text(&*panic))));
        let ended = match capture {
            true => self.graph.end(),
            false => Ok(()),
        };
        ran.and(ended)
    }
}

/// The message of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<String>(), panic.downcast_ref::<&str>()) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => s.to_string(),
        (None, None) => "a panic".into(),
    }
}

/// The training step's graph and the buffer its loss is written to.
pub struct StepGraph {
    recorded: Recorded,
    loss: Tensor,
}

impl StepGraph {
    pub fn new(device: Device) -> Result<StepGraph> {
        Ok(StepGraph {
            recorded: Recorded::new(device, WARMUP)?,
            loss: Tensor::zeros([], (Kind::Float, device)),
        })
    }

    /// One step: `body` (forward, backward and `adam.step_on_device()` from the static inputs,
    /// filled before) through [`Recorded::run`], the gradients set to none before it. Returns
    /// the step's mean loss (the graph's buffer: read it before the next step).
    pub fn step(
        &mut self,
        adam: &mut Adam,
        body: impl FnOnce(&mut Adam) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let loss = &self.loss;
        let ran = self.recorded.run(|| {
            adam.zero_grad();
            loss.shallow_clone().copy_(&body(adam)?.detach());
            Ok(())
        })?;
        if ran == Ran::Replay {
            // The host's count of Adam's steps (the device's is incremented by the graph).
            adam.step += 1;
        }
        Ok(self.loss.shallow_clone())
    }
}

#[cfg(trainer_graphs)]
use graph_ffi::Graph;

#[cfg(not(trainer_graphs))]
use no_graphs::Graph;

#[cfg(trainer_graphs)]
mod graph_ffi {
    use std::ffi::{c_char, c_int, c_void};
    use std::ptr::NonNull;

    use anyhow::Result;

    use crate::train::kernels::shim_call_for;

    extern "C" {
        fn trainer_graph_new(device: c_int, err: *mut c_char, errlen: c_int) -> *mut c_void;
        fn trainer_graph_free(graph: *mut c_void);
        fn trainer_graph_enter(graph: *mut c_void, err: *mut c_char, errlen: c_int) -> c_int;
        fn trainer_graph_exit(graph: *mut c_void, err: *mut c_char, errlen: c_int) -> c_int;
        fn trainer_graph_begin(graph: *mut c_void, err: *mut c_char, errlen: c_int) -> c_int;
        fn trainer_graph_end(graph: *mut c_void, err: *mut c_char, errlen: c_int) -> c_int;
        fn trainer_graph_replay(graph: *mut c_void, err: *mut c_char, errlen: c_int) -> c_int;
    }

    /// A `at::cuda::CUDAGraph` with its capture stream, freed on drop.
    pub struct Graph(NonNull<c_void>);

    type Entry = unsafe extern "C" fn(*mut c_void, *mut c_char, c_int) -> c_int;

    impl Graph {
        pub fn new(device: usize) -> Result<Graph> {
            let mut made = std::ptr::null_mut();
            // SAFETY: the shim writes a message into the buffer it is given on failure.
            shim_call_for("creating a CUDA graph", |err, len| unsafe {
                made = trainer_graph_new(device as c_int, err, len);
                made.is_null() as c_int
            })?;
            NonNull::new(made)
                .map(Graph)
                .ok_or_else(|| anyhow::anyhow!("creating a CUDA graph failed"))
        }

        fn call(&self, what: &str, entry: Entry) -> Result<()> {
            // SAFETY: `self.0` is a live graph made by trainer_graph_new.
            shim_call_for(what, |err, len| unsafe { entry(self.0.as_ptr(), err, len) })
        }

        /// Makes the graph's stream current (after the work queued on the current one).
        pub fn enter(&self) -> Result<()> {
            self.call("switching to the CUDA graph's stream", trainer_graph_enter)
        }

        /// Gives the previous stream back, after the graph stream's work.
        pub fn exit(&self) -> Result<()> {
            self.call("leaving the CUDA graph's stream", trainer_graph_exit)
        }

        pub fn begin(&self) -> Result<()> {
            self.call("starting the CUDA graph's capture", trainer_graph_begin)
        }

        pub fn end(&self) -> Result<()> {
            self.call(
                "capturing the training step in a CUDA graph",
                trainer_graph_end,
            )
        }

        pub fn replay(&self) -> Result<()> {
            self.call("replaying the CUDA graph", trainer_graph_replay)
        }
    }

    impl Drop for Graph {
        fn drop(&mut self) {
            // SAFETY: made by trainer_graph_new, freed once.
            unsafe { trainer_graph_free(self.0.as_ptr()) }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_in_a_recorded_body_becomes_its_message() {
        let p = std::panic::catch_unwind(|| panic!("bad op {}", 7)).unwrap_err();
        assert_eq!(super::panic_text(&*p), "bad op 7");
        let p = std::panic::catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(super::panic_text(&*p), "static");
    }
}

/// A build without CUDA graphs: none can be made ([`refusal`] says so before).
#[cfg(not(trainer_graphs))]
mod no_graphs {
    use anyhow::{bail, Result};

    pub enum Graph {}

    impl Graph {
        pub fn new(_device: usize) -> Result<Graph> {
            bail!("this trainer was built without CUDA graphs")
        }
        pub fn enter(&self) -> Result<()> {
            match *self {}
        }
        pub fn exit(&self) -> Result<()> {
            match *self {}
        }
        pub fn begin(&self) -> Result<()> {
            match *self {}
        }
        pub fn end(&self) -> Result<()> {
            match *self {}
        }
        pub fn replay(&self) -> Result<()> {
            match *self {}
        }
    }
}
