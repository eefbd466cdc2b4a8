fn main() -> std::process::ExitCode {
    nodeagent::cli::main()
}
