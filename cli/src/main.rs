//! `shoal`: one binary for the coordinator, the agent and the client commands.

fn main() {
    eprintln!("shoal: no subcommands yet");
    std::process::exit(2);
}
