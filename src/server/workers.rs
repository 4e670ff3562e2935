//! Worker threads, each running its own single-threaded runtime, as nginx runs one
//! worker process per core.
//!
//! Every worker accepts on every listener (each through its own duplicate of the
//! listening socket, registered with its own reactor) and serves what it accepted to
//! the end: a request's tasks, timers and socket wake-ups stay on one thread, with no
//! work-stealing bookkeeping or cross-thread wake-up on the hot path. The upstream pool
//! hands out the connections a worker opened to that same worker first.

use std::io;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The running worker threads; dropping this stops them, closing what they still serve.
pub struct Workers {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    pub fn start(count: usize) -> io::Result<Workers> {
        let mut workers = Workers {
            handles: Vec::with_capacity(count),
            stops: Vec::with_capacity(count),
            threads: Vec::with_capacity(count),
        };
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            workers.handles.push(runtime.handle().clone());
            let thread = std::thread::Builder::new()
                .name(format!("qp-worker-{index}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(Some(index)));
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            workers.stops.push(stop);
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Stops every worker and waits for its thread to end.
    pub fn stop(mut self) {
        self.stops.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Dropping the senders ends each worker's `block_on`; the runtime then drops
        // the connections it still had. Not joined here: a drop may happen on an async
        // thread, which must not block.
        self.stops.clear();
    }
}

thread_local! {
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The worker this code runs on, if any (the control thread and tests' runtimes have
/// none).
pub fn current() -> Option<usize> {
    WORKER.with(|w| w.get())
}
