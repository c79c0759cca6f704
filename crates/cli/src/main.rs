//! The `nibble` program; see [`nibble_cli`].

use clap::Parser;

fn main() {
    let cli = nibble_cli::args::Cli::parse();
    if let Err(e) = nibble_cli::run(cli) {
        eprintln!("nibble: error: {e}");
        std::process::exit(1);
    }
}
