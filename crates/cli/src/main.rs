//! The `nibble` program; see [`nibble_cli`].

use clap::Parser;

fn main() {
    // Freed activation buffers stay in the process (training steps and large batches
    // otherwise page-fault them afresh each time): see `nibble_tensor::heap`.
    nibble_tensor::heap::retain_freed_memory();
    let cli = nibble_cli::args::Cli::parse();
    if let Err(e) = nibble_cli::run(cli) {
        eprintln!("nibble: error: {e}");
        std::process::exit(1);
    }
}
