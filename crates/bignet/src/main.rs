//! The `bignet` program. See `bignet --help`.

use clap::Parser;
use nibble_bignet::cli::{run, Cli};
use nibble_bignet::memory::CountingAlloc;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn main() {
    exit_on_closed_pipe();
    let cli = Cli::parse();
    nibble_tensor::heap::retain_freed_memory();
    if let Err(e) = run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Ends the process quietly when stdout is a pipe whose reader has gone (`nibble inspect … |
/// head`), as Unix tools do, instead of panicking on the failed print (Rust ignores SIGPIPE).
fn exit_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restoring the default action of SIGPIPE before any thread starts; `signal` has
    // no other effect.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
