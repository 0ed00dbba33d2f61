//! The `portcullis` binary: parse arguments, start logging, call the library.

use std::process::ExitCode;

/// mimalloc: a full snapshot rebuild allocates heavily; see Cargo.toml.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use portcullis::cli::{Cli, Command, OutputFormat};
use portcullis::commands;

fn main() -> ExitCode {
    portcullis::tls::install_default_provider();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check(args)) => check(args),
        Some(Command::Explain(args)) => explain(args),
        Some(Command::Run(args)) => portcullis::run::main(*args),
        None => portcullis::run::main(*cli.run),
        Some(Command::Echo(args)) => portcullis::run::echo(args),
        Some(Command::Demo(args)) => portcullis::run::demo(args),
        Some(Command::Certs(args)) => portcullis::certs::main(&args.hosts, &args.out),
    }
}

fn load(source: &portcullis::cli::SourceArgs) -> Result<portcullis::files::Loaded, ExitCode> {
    if source.manifests.is_empty() {
        eprintln!("error: --manifests PATH is required");
        return Err(ExitCode::from(2));
    }
    portcullis::files::load(&source.manifests).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(if e.is_parse() { 1 } else { 2 })
    })
}

fn check(args: portcullis::cli::CheckArgs) -> ExitCode {
    let loaded = match load(&args.source) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let (files, objects) = (loaded.files.len(), loaded.objects);
    let snapshot = commands::snapshot_of(loaded, &args.source.file_options(Vec::new()));
    match args.output {
        OutputFormat::Text => print!("{}", commands::check_text(&snapshot, files, objects)),
        OutputFormat::Json => println!("{:#}", commands::check_json(&snapshot, files, objects)),
    }
    ExitCode::from(commands::check_status(&snapshot) as u8)
}

fn explain(args: portcullis::cli::ExplainArgs) -> ExitCode {
    let loaded = match load(&args.source) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let snapshot = commands::snapshot_of(loaded, &args.source.file_options(Vec::new()));
    let headers: http::HeaderMap = args.headers.into_iter().collect();
    match commands::explain_request(&snapshot, &args.url, &args.method, &headers) {
        Ok(ex) => {
            match args.output {
                OutputFormat::Text => print!("{}", commands::explain_text(&ex)),
                OutputFormat::Json => match serde_json::to_string_pretty(&ex) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                },
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
