fn main() -> std::process::ExitCode {
    asb_gateway::cli::main()
}
