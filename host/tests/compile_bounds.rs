//! A plugin's compile is bounded and never holds up a rollback: a serving host compiles in a
//! child process with a deadline and an address-space cap, and a rollback made while a
//! candidate compiles returns at once and is not undone by that candidate. No services
//! needed (the embedded default); needs the plugins built (scripts/build-plugins).

#[path = "common/process.rs"]
mod process;

use process::{TOKEN, http, http_as, repo, run_host};
use std::path::Path;
use std::time::{Duration, Instant};

/// LEB128 of `n`.
fn leb(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn section(id: u8, content: &[u8], out: &mut Vec<u8>) {
    out.push(id);
    leb(content.len(), out);
    out.extend_from_slice(content);
}

/// A valid component that is slow to compile: one core module of `functions` functions, each
/// a long chain of arithmetic over many locals (register pressure for the allocator). It
/// implements no interface: it is refused after compiling, if it ever compiles.
fn slow_component(functions: usize, steps: usize) -> Vec<u8> {
    const LOCALS: usize = 200;
    let mut body = Vec::new();
    body.push(1); // one group of locals
    leb(LOCALS, &mut body);
    body.push(0x7e); // i64
    for i in 0..steps {
        let (a, b, c) = (i % LOCALS, (i * 7 + 3) % LOCALS, (i * 13 + 5) % LOCALS);
        body.push(0x20); // local.get a
        leb(a, &mut body);
        body.push(0x20); // local.get b
        leb(b, &mut body);
        body.push(0x7c); // i64.add
        body.push(0x20); // local.get c
        leb(c, &mut body);
        body.push(0x7e); // i64.mul
        body.push(0x21); // local.set a
        leb(a, &mut body);
    }
    body.push(0x0b); // end
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut module); // one type: [] -> []
    let mut funcs = Vec::new();
    leb(functions, &mut funcs);
    funcs.extend(std::iter::repeat_n(0u8, functions));
    section(3, &funcs, &mut module);
    let mut code = Vec::new();
    leb(functions, &mut code);
    for _ in 0..functions {
        leb(body.len(), &mut code);
        code.extend_from_slice(&body);
    }
    section(10, &code, &mut module);
    let mut component = b"\0asm\x0d\0\x01\0".to_vec();
    section(1, &module, &mut component); // a core module section
    component
}

fn version_of(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(bytes)[..8])
}

/// Write `bytes` to `path` the way a sync does: a temporary name, then a rename.
fn install(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn group_status(addr: &str) -> serde_json::Value {
    let (status, body) = http(addr, "GET", "/v1/plugins", "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["groups"][0].clone()
}

fn wait_for(
    addr: &str,
    what: &str,
    limit: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let g = group_status(addr);
        if done(&g) {
            return g;
        }
        assert!(
            start.elapsed() < limit,
            "waited {limit:?} for {what}: {g:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(") ")?
                        .1
                        .split(' ')
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(pid)
        })
        .collect()
}

/// `component` with a custom section appended: still valid, the same code, another version.
fn another_version(component: &[u8]) -> Vec<u8> {
    let mut content = Vec::new();
    leb(4, &mut content);
    content.extend_from_slice(b"note");
    content.extend_from_slice(b"another build");
    let mut out = component.to_vec();
    section(0, &content, &mut out);
    out
}

/// A spec directory with one group served by `live.wasm` in a plugin directory beside it,
/// installed from the example plugin: the two directories and that plugin's bytes.
fn layout(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let (specs, plugins) = (dir.join("specs"), dir.join("plugins"));
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::write(specs.join("live.yaml"), live_spec(5)).unwrap();
    let v1 = std::fs::read(repo().join("plugins/dist/user_activity.wasm")).unwrap();
    install(&plugins.join("live.wasm"), &v1);
    (specs, plugins, v1)
}

/// The spec of group `live`, its plugin config's `last_k` set to `last_k`.
fn live_spec(last_k: u32) -> String {
    format!(
        "apiVersion: feature-host/v1\nkind: FeatureGroup\nmetadata: {{name: live}}\nspec:\n  entity: user\n  features: [{{name: clicks, type: int}}, {{name: views, type: int}}, {{name: last_viewed, type: string-list}}]\n  plugin:\n    wasm: live.wasm\n    config: {{entity_field: user_id, list_field: item_id, list_feature: last_viewed, last_k: {last_k}}}\n  sources: [{{topic: web-events}}]\n"
    )
}

#[test]
fn a_rollback_during_a_slow_compile_returns_at_once_and_the_compile_is_cut_off() {
    let dir = std::env::temp_dir().join(format!("fh-compile-{}", std::process::id()));
    let (specs, plugins, v1) = layout(&dir);
    let live = plugins.join("live.wasm");
    let cache = dir.join("plugin-cache");
    let env = |timeout: &'static str| {
        vec![
            ("FH_SPEC_DIR", specs.to_str().unwrap().to_owned()),
            ("FH_PLUGIN_DIR", plugins.to_str().unwrap().to_owned()),
            ("FH_PLUGIN_CACHE_DIR", cache.to_str().unwrap().to_owned()),
            ("FH_PLUGIN_COMPILE_TIMEOUT", timeout.to_owned()),
            ("FH_RELOAD_POLL", "1h".to_owned()),
        ]
    };
    let start = |timeout| {
        let env = env(timeout);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_host(&dir.join("data"), &env)
    };
    // A first start compiles the plugin into the artifact cache, so that the short deadline
    // below applies to the slow candidate only.
    let (mut warm, _) = start("120s");
    assert!(warm.terminate());
    let (mut host, addr) = start("10s");

    // A spec change is a candidate too (the plugin itself compiled already): after it, the
    // group has a version to roll back to.
    install(&specs.join("live.yaml"), live_spec(6).as_bytes());
    wait_for(
        &addr,
        "the spec change to be applied",
        Duration::from_secs(60),
        |g| g["last_reload"]["result"] == "applied",
    );

    // Slow to compile on any machine: well past the 10 s deadline.
    let slow = slow_component(150, 20_000);
    install(&live, &slow);
    wait_for(
        &addr,
        "the slow candidate to compile",
        Duration::from_secs(60),
        |g| g["building"] == version_of(&slow),
    );
    // The compiler is the process the kernel kills first when the pod runs out of memory.
    // (The child may not have started, or set it, the instant the status says "building".)
    let since = Instant::now();
    let adjusted = loop {
        let adj: Vec<String> = children(host.0.id())
            .iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/oom_score_adj")).ok())
            .map(|a| a.trim().to_owned())
            .collect();
        if adj.iter().any(|a| a == "1000") || since.elapsed() > Duration::from_secs(5) {
            break adj;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(adjusted, ["1000"], "the compiler's oom_score_adj");
    let (status, body) = http_as(&addr, "POST", "/v1/plugins/live/rollback", "", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&version_of(&v1)), "{body}");

    let g = wait_for(
        &addr,
        "the compile to be cut off",
        Duration::from_secs(90),
        |g| {
            g["history"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["result"] == "rejected")
        },
    );
    let history = g["history"].as_array().unwrap();
    let at = |result: &str| history.iter().position(|r| r["result"] == result).unwrap();
    assert!(
        at("rolled_back") < at("rejected"),
        "the rollback waited for the compile: {g:#}"
    );
    let rejected = &history[at("rejected")];
    let reason = rejected["error"].as_str().unwrap();
    assert!(
        reason.contains("did not compile within 10s")
            && reason.contains("FH_PLUGIN_COMPILE_TIMEOUT"),
        "{reason}"
    );
    assert_eq!(rejected["version"], version_of(&slow));
    assert_eq!(
        g["version"],
        version_of(&v1),
        "the rolled-back version serves"
    );
    assert!(g.get("building").is_none(), "{g:#}");
    assert!(host.terminate());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_compile_over_its_memory_cap_is_refused_and_the_loaded_version_serves() {
    let dir = std::env::temp_dir().join(format!("fh-compile-mem-{}", std::process::id()));
    let (specs, plugins, v1) = layout(&dir);
    let live = plugins.join("live.wasm");
    let (mut host, addr) = run_host(
        &dir.join("data"),
        &[
            ("FH_SPEC_DIR", specs.to_str().unwrap()),
            ("FH_PLUGIN_DIR", plugins.to_str().unwrap()),
            ("FH_PLUGIN_COMPILE_MEMORY_MB", "256"),
            ("FH_RELOAD_POLL", "1h"),
        ],
    );
    // One function as large as wasm allows: its compile needs more than 256 MiB (the
    // example plugin about 160).
    let big = slow_component(1, 600_000);
    install(&live, &big);
    let g = wait_for(
        &addr,
        "the candidate to be refused",
        Duration::from_secs(120),
        |g| g["last_reload"]["result"] == "rejected",
    );
    let reason = g["last_reload"]["error"].as_str().unwrap();
    assert!(
        reason.contains("256 MiB") && reason.contains("FH_PLUGIN_COMPILE_MEMORY_MB"),
        "{reason}"
    );
    assert_eq!(g["last_reload"]["version"], version_of(&big));
    assert_eq!(g["version"], version_of(&v1));
    assert!(host.terminate());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_candidate_discarded_by_a_rollback_is_not_applied_later() {
    let dir = std::env::temp_dir().join(format!("fh-compile-discard-{}", std::process::id()));
    let (specs, plugins, v1) = layout(&dir);
    let live = plugins.join("live.wasm");
    let cache = dir.join("plugin-cache");
    let env = [
        ("FH_SPEC_DIR", specs.to_str().unwrap()),
        ("FH_PLUGIN_DIR", plugins.to_str().unwrap()),
        ("FH_PLUGIN_CACHE_DIR", cache.to_str().unwrap()),
        // Every second a full pass looks at the directories again.
        ("FH_RELOAD_POLL", "1s"),
    ];
    let (mut host, addr) = run_host(&dir.join("data"), &env);
    install(&specs.join("live.yaml"), live_spec(6).as_bytes());
    wait_for(
        &addr,
        "the spec change to be applied",
        Duration::from_secs(60),
        |g| g["last_reload"]["result"] == "applied",
    );
    // A good candidate, compiled from scratch (seconds): the operator rolls back meanwhile.
    let v2 = another_version(&v1);
    install(&live, &v2);
    wait_for(
        &addr,
        "the candidate to compile",
        Duration::from_secs(60),
        |g| g["building"] == version_of(&v2),
    );
    let (status, body) = http_as(&addr, "POST", "/v1/plugins/live/rollback", "", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    // The candidate is discarded, and said to be ...
    let g = wait_for(
        &addr,
        "the candidate to be discarded",
        Duration::from_secs(120),
        |g| g["last_reload"]["result"] == "discarded",
    );
    assert_eq!(g["last_reload"]["version"], version_of(&v2), "{g:#}");
    // ... and later passes leave it alone until the plugin or its spec changes again.
    std::thread::sleep(Duration::from_secs(4));
    let g = group_status(&addr);
    assert_eq!(g["version"], version_of(&v1), "{g:#}");
    assert_eq!(g["last_reload"]["result"], "discarded", "{g:#}");
    // A new candidate is applied as usual.
    install(&specs.join("live.yaml"), live_spec(7).as_bytes());
    let g = wait_for(
        &addr,
        "the next candidate to be applied",
        Duration::from_secs(120),
        |g| g["last_reload"]["result"] == "applied",
    );
    assert_eq!(g["version"], version_of(&v2), "{g:#}");
    assert!(host.terminate());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The artifact files in `cache`, by name.
fn cache_files(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

#[test]
fn the_artifact_cache_is_pruned_bounded_and_keeps_only_accepted_builds() {
    let dir = std::env::temp_dir().join(format!("fh-compile-cache-{}", std::process::id()));
    let (specs, plugins, v1) = layout(&dir);
    let live = plugins.join("live.wasm");
    let cache = dir.join("plugin-cache");
    std::fs::create_dir_all(&cache).unwrap();
    // Left behind a day ago: a write cut off by a crash, and artifacts of other components
    // (or of an older host) nobody loads any more.
    let day_ago = std::time::SystemTime::now() - Duration::from_secs(86_400);
    let mut stale = vec![format!(
        "{}-{}.tmp-0123456789abcdef",
        "a".repeat(64),
        "0".repeat(16)
    )];
    stale.extend((0..3).map(|i| format!("{}-{}.cwasm", i.to_string().repeat(64), "f".repeat(16))));
    for name in &stale {
        let path = cache.join(name);
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(day_ago)
            .unwrap();
    }
    let (mut host, addr) = run_host(
        &dir.join("data"),
        &[
            ("FH_SPEC_DIR", specs.to_str().unwrap()),
            ("FH_PLUGIN_DIR", plugins.to_str().unwrap()),
            ("FH_PLUGIN_CACHE_DIR", cache.to_str().unwrap()),
            ("FH_PLUGIN_CACHE_MAX_MB", "1"),
            ("FH_RELOAD_POLL", "1h"),
        ],
    );
    let v1_sha = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&v1))
    };
    let files = cache_files(&cache);
    assert_eq!(
        files.len(),
        1,
        "only the serving plugin's artifact: {files:?}"
    );
    assert!(files[0].starts_with(&v1_sha), "{files:?}");

    // A candidate that compiles and is refused leaves nothing in the cache: a tenant cannot
    // fill the disk with builds nobody serves.
    let refused = slow_component(1, 10);
    install(&live, &refused);
    wait_for(
        &addr,
        "the candidate to be refused",
        Duration::from_secs(60),
        |g| g["last_reload"]["result"] == "rejected",
    );
    assert_eq!(cache_files(&cache), files, "the refused build was cached");
    assert!(host.terminate());
    let _ = std::fs::remove_dir_all(&dir);
}
