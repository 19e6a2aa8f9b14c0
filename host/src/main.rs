use clap::Parser as _;
use feature_host::cli::{Cli, Command, init_logging, main as cli_main};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The plugin compiler child: no runtime, no logging set-up, nothing but the compile.
    if let Command::CompilePlugin {
        memory_bytes,
        cpu_seconds,
        parallel,
    } = cli.command
    {
        return feature_host::plugin::compiler::child_main(memory_bytes, cpu_seconds, parallel);
    }
    // Set up outside the runtime: the trace exporter's HTTP client is a blocking one, which
    // must neither be created nor dropped on an async worker.
    let telemetry = match init_logging(cli.log_format, &cli.command, cli.otlp_endpoint.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // A panic, caught (a damaged Parquet page's, a task's) or not, is logged like every other
    // error, with its place: a JSON log pipeline would miss the default hook's plain text.
    std::panic::set_hook(Box::new(|info| {
        let place = info.location().map(ToString::to_string).unwrap_or_default();
        let message = info.payload_as_str().unwrap_or("(no message)");
        // As the default hook does: a backtrace when RUST_BACKTRACE asks for one.
        let backtrace = std::backtrace::Backtrace::capture();
        match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => {
                tracing::error!(%place, message, %backtrace, "panic")
            }
            _ => tracing::error!(%place, message, "panic"),
        }
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    let code = runtime.block_on(async {
        match cli_main(cli).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    });
    drop(runtime);
    if let Some(provider) = telemetry
        && let Err(e) = provider.shutdown()
    {
        eprintln!("warning: traces not flushed: {e}");
    }
    code
}
