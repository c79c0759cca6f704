//! The `nibble` program; see [`nibble_cli`].

use clap::Parser;

fn main() {
    exit_on_closed_pipe();
    // Freed activation buffers stay in the process (training steps and large batches
    // otherwise page-fault them afresh each time): see `nibble_tensor::heap`.
    nibble_tensor::heap::retain_freed_memory();
    let cli = nibble_cli::args::Cli::parse();
    if let Err(e) = nibble_cli::run(cli) {
        eprintln!("nibble: error: {e}");
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
