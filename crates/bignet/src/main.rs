//! The `bignet` program. See `bignet --help`.

use clap::Parser;
use nibble_bignet::cli::{run, Cli};
use nibble_bignet::memory::CountingAlloc;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn main() {
    let cli = Cli::parse();
    nibble_tensor::heap::retain_freed_memory();
    if let Err(e) = run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
