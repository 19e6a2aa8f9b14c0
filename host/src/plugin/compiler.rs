//! Compiling a component in a child process, bounded in time and memory.
//!
//! Cranelift's time and memory grow with the component, and a compile cannot be interrupted:
//! compiled inside the host, a hostile (or merely huge) component takes cores and memory from
//! the stream for as long as it likes, and a thread that overran its deadline can only be
//! abandoned, still running. So a serving host compiles in a child: the same binary
//! (`feature-host compile-plugin`, hidden) with the same engine configuration, which caps its
//! own address space and CPU time before it reads a byte. The host writes the component to
//! the child's stdin and reads the compiled artifact from its stdout; past the deadline it
//! kills the child and refuses the plugin.
//!
//! The artifact never touches the disk between the two: nothing but the child can have
//! written what the host then loads (`Component::deserialize` runs it as machine code).
//!
//! The child's memory counts against the pod's limit: `FH_PLUGIN_COMPILE_MEMORY_MB` plus
//! the host's own use must fit under it, or a large compile makes the kernel's OOM killer
//! choose. The child asks to be chosen first (`oom_score_adj` 1000), which spares the host
//! where the kernel kills one process (cgroup v1, kubelet's single-process OOM kill); on
//! cgroup v2 Kubernetes kills the whole container, so the sum is the real bound.
//!
//! The limit: the child is a process of the host's own user, so it bounds a compile's
//! resources, not what a compiler bug could do with them.

use super::PluginError;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How a serving host compiles.
#[derive(Debug, Clone)]
pub struct CompilerSettings {
    /// The `feature-host` binary (the running one).
    pub exe: PathBuf,
    /// Wall-clock time one compile may take (CPU time is capped too, as a backstop).
    pub timeout: Duration,
    /// Address space the compiling process may map.
    pub memory_bytes: u64,
}

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "compile-plugin";

/// Compile `bytes` in a child; the serialized component (to deserialize with an engine of the
/// same configuration).
/// `parallel`: compile the component's functions on several threads (at startup; a serving
/// host compiles on one, so a reload takes one core from the stream, not all of them).
pub fn compile_in_child(
    settings: &CompilerSettings,
    path: &str,
    bytes: &[u8],
    parallel: bool,
) -> Result<Vec<u8>, PluginError> {
    let failed = |message: String| PluginError::Compile {
        path: path.into(),
        message,
    };
    // A backstop behind the wall-clock deadline: as much CPU as every core for that long,
    // so the deadline is what a compile meets first.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let cpu_seconds = (settings.timeout.as_secs_f64() * cores).ceil() as u64 + 1;
    let mut command = Command::new(&settings.exe);
    command
        .arg(SUBCOMMAND)
        .arg("--memory-bytes")
        .arg(settings.memory_bytes.to_string())
        .arg("--cpu-seconds")
        .arg(cpu_seconds.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Nothing of the host's environment (tokens, credentials) is the compiler's business.
        .env_clear()
        // One malloc arena: each extra one reserves 64 MiB of address space, which would make
        // the cap depend on how many threads happened to allocate.
        .env("MALLOC_ARENA_MAX", "1");
    if parallel {
        command.arg("--parallel");
    }
    let mut child = command.spawn().map_err(|e| {
        failed(format!(
            "cannot start the compiler process {}: {e}",
            settings.exe.display()
        ))
    })?;
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(failed("the compiler process has no pipes".into()));
    };
    std::thread::scope(|scope| {
        // Pipes fill: feed and drain on their own threads while this one keeps the clock.
        let feeder = scope.spawn(move || stdin.write_all(bytes));
        let reader = scope.spawn(move || {
            let mut out = Vec::new();
            stdout.read_to_end(&mut out).map(|_| out)
        });
        let errors = scope.spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.read_to_end(&mut text);
            crate::text::truncate(String::from_utf8_lossy(&text).trim(), 1024)
        });
        let deadline = Instant::now() + settings.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(PluginError::CompileTimeout {
                        path: path.into(),
                        limit: settings.timeout,
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(failed(format!("lost the compiler process: {e}")));
                }
            }
        };
        let _ = feeder.join();
        let out = reader.join();
        let errors = errors.join().unwrap_or_default();
        let status = status?;
        if !status.success() {
            use std::os::unix::process::ExitStatusExt as _;
            let out_of_memory = errors.contains("memory allocation")
                || errors.contains("out of memory")
                || errors.contains("Cannot allocate memory");
            let why = match status.signal() {
                _ if out_of_memory => format!(
                    "the compiler ran out of its {} MiB of address space (FH_PLUGIN_COMPILE_MEMORY_MB)",
                    settings.memory_bytes >> 20
                ),
                // RLIMIT_CPU's signal (its hard limit's SIGKILL never comes: SIGXCPU ends
                // the child first).
                Some(24) => format!(
                    "the compiler ran out of its {cpu_seconds} s of CPU time (FH_PLUGIN_COMPILE_TIMEOUT)"
                ),
                // Not the deadline's kill (handled above): the kernel's OOM killer, the only
                // other sender here, which prefers the compiler (its oom_score_adj).
                Some(9) => format!(
                    "the compiler was killed (SIGKILL) before it finished, most likely by the \
                     kernel's out-of-memory killer: the pod (or machine) reached its memory limit. Raise \
                     that limit, or lower FH_PLUGIN_COMPILE_MEMORY_MB ({} MiB) so a compile \
                     fails within it",
                    settings.memory_bytes >> 20
                ),
                Some(sig) => format!("the compiler was killed by signal {sig}"),
                None => format!("the compiler failed ({status})"),
            };
            let detail = if errors.is_empty() {
                String::new()
            } else {
                format!(": {errors}")
            };
            return Err(failed(format!("{why}{detail}")));
        }
        match out {
            Ok(Ok(artifact)) => Ok(artifact),
            Ok(Err(e)) => Err(failed(format!("reading the compiled artifact: {e}"))),
            Err(_) => Err(failed("reading the compiled artifact: panicked".into())),
        }
    })
}

/// The child's side: cap this process, read a component from stdin, write its compiled
/// artifact to stdout. An error goes to stderr (the host shows its start) with exit code 1.
pub fn child_main(memory_bytes: u64, cpu_seconds: u64, parallel: bool) -> std::process::ExitCode {
    match child(memory_bytes, cpu_seconds, parallel) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn child(memory_bytes: u64, cpu_seconds: u64, parallel: bool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use rlimit::Resource;
    // When the pod (a cgroup) runs out of memory, the kernel kills the process with the
    // highest score: make that the compiler, not the host. Raising one's own score needs no
    // privilege; a kernel without the file only loses the preference.
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    // Before reading a byte of the component.
    Resource::AS
        .set(memory_bytes, memory_bytes)
        .context("cannot cap the compiler's address space")?;
    Resource::CPU
        .set(cpu_seconds, cpu_seconds.saturating_add(1))
        .context("cannot cap the compiler's CPU time")?;
    let mut bytes = Vec::new();
    std::io::stdin()
        .take(super::engine::MAX_COMPONENT_BYTES + 1)
        .read_to_end(&mut bytes)?;
    anyhow::ensure!(
        bytes.len() as u64 <= super::engine::MAX_COMPONENT_BYTES,
        "the component is larger than {} bytes",
        super::engine::MAX_COMPONENT_BYTES
    );
    let engine = wasmtime::Engine::new(&super::engine::base_config(parallel))
        .map_err(|e| anyhow::anyhow!("cannot create the compiler's engine: {e:#}"))?;
    let artifact = engine
        .precompile_component(&bytes)
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let mut out = std::io::stdout().lock();
    out.write_all(&artifact)?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in compiler that reads its input and then does `action` to itself.
    fn compiler(name: &str, action: &str) -> CompilerSettings {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("fh-compiler-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join(name);
        std::fs::write(&exe, format!("#!/bin/sh\ncat > /dev/null\n{action}\n")).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        CompilerSettings {
            exe,
            timeout: Duration::from_secs(60),
            memory_bytes: 256 << 20,
        }
    }

    #[test]
    fn a_compiler_killed_outright_is_not_said_to_have_run_out_of_cpu() {
        // What the kernel's OOM killer does when the pod runs out of memory: SIGKILL, and
        // nothing on stderr.
        let e = compile_in_child(&compiler("oom.sh", "kill -KILL $$"), "x.wasm", b"", false)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("CPU time"), "{e}");
        assert!(e.contains("SIGKILL") && e.contains("memory limit"), "{e}");
        // RLIMIT_CPU's signal is CPU time.
        let e = compile_in_child(&compiler("cpu.sh", "kill -XCPU $$"), "x.wasm", b"", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("CPU time"), "{e}");
    }
}
