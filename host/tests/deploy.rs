//! The Kubernetes manifests and the Dockerfile agree with the host: probe paths it serves, the
//! admin port it binds, settings it knows, a grace period that covers its drain, selectors
//! that select, a non-root user, specs that validate. (`scripts/check-deploy` checks every
//! manifest against the Kubernetes schemas; this checks what a schema cannot.)

use clap::CommandFactory as _;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy/k8s")
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every resource of the kustomization, by kind.
fn resources() -> (Value, BTreeMap<String, Value>) {
    let k = yaml(&root().join("kustomization.yaml"));
    let mut by_kind = BTreeMap::new();
    for r in k["resources"].as_array().expect("resources") {
        let path = root().join(r.as_str().unwrap());
        assert!(
            path.is_file(),
            "kustomization lists {} but it is missing",
            path.display()
        );
        let doc = yaml(&path);
        for field in ["apiVersion", "kind"] {
            assert!(doc[field].is_string(), "{}: no {field}", path.display());
        }
        assert!(
            doc["metadata"]["name"].is_string(),
            "{}: no metadata.name",
            path.display()
        );
        by_kind.insert(doc["kind"].as_str().unwrap().to_owned(), doc);
    }
    (k, by_kind)
}

/// `FH_*` literals of the generated config map.
fn config(k: &Value) -> BTreeMap<String, String> {
    k["configMapGenerator"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["literals"].as_array().cloned().unwrap_or_default())
        .map(|l| {
            let (k, v) = l.as_str().unwrap().split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// Labels every resource gets from the kustomization (selectors included).
fn common_labels(k: &Value) -> BTreeMap<String, String> {
    k["labels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["pairs"].as_object().cloned().unwrap_or_default())
        .map(|(k, v)| (k, v.as_str().unwrap().to_owned()))
        .collect()
}

fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
}

fn labels_of(v: &Value, common: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut l = common.clone();
    for (k, v) in v.as_object().into_iter().flatten() {
        l.insert(k.clone(), v.as_str().unwrap().to_owned());
    }
    l
}

#[test]
fn manifests_agree_with_the_host() {
    let (k, r) = resources();
    let common = common_labels(&k);
    let config = config(&k);
    let deployment = &r["Deployment"];
    let pod = &deployment["spec"]["template"];
    let host = &pod["spec"]["containers"][0];
    let env: BTreeMap<String, String> = host["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap_or("<from secret>").to_owned(),
            )
        })
        .collect();

    // Every FH_* setting in the manifests is one the host knows.
    let cli = feature_host::cli::Cli::command();
    let run = cli.find_subcommand("run").unwrap();
    let known: Vec<String> = run
        .get_arguments()
        .chain(cli.get_arguments())
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    for name in env
        .keys()
        .chain(config.keys())
        .filter(|n| n.starts_with("FH_"))
    {
        assert!(
            known.contains(name),
            "{name} is not a setting of `feature-host run`"
        );
    }

    // Probes hit paths the admin API serves, on the port it binds.
    let port = env["FH_ADMIN_ADDR"]
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    let ports = host["ports"].as_array().unwrap();
    let admin = ports
        .iter()
        .find(|p| p["name"] == "admin")
        .expect("an admin port");
    assert_eq!(admin["containerPort"].as_u64(), Some(port));
    assert_eq!(
        host["readinessProbe"]["httpGet"]["path"],
        feature_host::admin::READY_PATH
    );
    assert_eq!(
        host["livenessProbe"]["httpGet"]["path"],
        feature_host::admin::HEALTH_PATH
    );
    assert_eq!(host["args"][0], "run");

    // The grace period covers preStop plus the drain.
    let drain = humantime::parse_duration(&config["FH_DRAIN_TIMEOUT"])
        .unwrap()
        .as_secs();
    let pre_stop = host["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        grace >= pre_stop + drain + 5,
        "terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop}s + FH_DRAIN_TIMEOUT {drain}s + margin"
    );

    // Selectors select.
    let pod_labels = labels_of(&pod["metadata"]["labels"], &common);
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        &pod_labels
    ));
    assert!(selects(
        &r["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        &pod_labels
    ));
    let service = &r["Service"];
    assert!(selects(&service["spec"]["selector"], &pod_labels));
    let service_labels = labels_of(&service["metadata"]["labels"], &common);
    let monitor = &r["ServiceMonitor"];
    assert!(
        selects(&monitor["spec"]["selector"]["matchLabels"], &service_labels),
        "the ServiceMonitor does not select the Service"
    );
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"], feature_host::admin::METRICS_PATH);
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == endpoint["port"]),
        "the ServiceMonitor scrapes a port the Service does not have"
    );
    assert!(
        ports
            .iter()
            .any(|p| p["name"] == service["spec"]["ports"][0]["targetPort"])
    );

    // IRSA, non-root, read-only root file system with a writable data dir.
    let sa = &r["ServiceAccount"];
    assert_eq!(pod["spec"]["serviceAccountName"], sa["metadata"]["name"]);
    assert!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
            .as_str()
            .is_some_and(|a| a.starts_with("arn:aws:iam::")),
        "the service account needs an IRSA role annotation"
    );
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    assert_eq!(host["securityContext"]["readOnlyRootFilesystem"], true);
    let mounts: Vec<&str> = host["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for dir in ["FH_DATA_DIR", "FH_SPEC_DIR", "FH_PLUGIN_DIR"] {
        assert!(
            mounts.contains(&env[dir].as_str()),
            "{dir}={} is not a mounted volume",
            env[dir]
        );
    }
}

#[test]
fn the_shipped_specs_validate() {
    let specs = root().join("specs");
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("plugins/dist");
    if !plugins.join("user_activity.wasm").is_file() {
        eprintln!("plugins not built; run scripts/build-plugins (scripts/test does)");
        return;
    }
    let set = feature_host::spec::load_dir(&specs, &plugins).unwrap_or_else(|e| panic!("{e}"));
    assert!(!set.groups.is_empty());
    let (k, _) = resources();
    let shipped: Vec<String> = k["configMapGenerator"][0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect();
    for entry in std::fs::read_dir(&specs).unwrap() {
        let name = format!("specs/{}", entry.unwrap().file_name().to_string_lossy());
        assert!(
            shipped.contains(&name),
            "{name} is not in the specs ConfigMap"
        );
    }
}

#[test]
fn the_image_runs_as_a_non_root_user() {
    let text = std::fs::read_to_string(root().join("../../Dockerfile")).unwrap();
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage build expected");
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .expect("numeric USER");
    assert_ne!(uid, 0);
    assert!(text.contains("ENTRYPOINT [\"feature-host\"]"));
}

/// Every sample name the host exports.
fn exported() -> Vec<String> {
    feature_host::metrics::Metrics::new()
        .series_names()
        .to_vec()
}

fn referenced(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("fh_") {
        let start = i + at;
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - start);
        // Only whole identifiers (not e.g. `xfh_`).
        if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            out.push(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

#[test]
fn dashboard_and_alerts_use_metrics_the_host_exports() {
    let exported = exported();
    assert!(exported.len() > 20, "{exported:?}");
    let deploy = root().join("..");
    for file in ["grafana/feature-host.json", "prometheus/alerts.yaml"] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        let used = referenced(&text);
        assert!(!used.is_empty(), "{file} uses no metric");
        for m in used {
            assert!(
                exported.contains(&m),
                "{file} uses {m}, which the host does not export"
            );
        }
    }
    // The dashboard is valid JSON with a query per panel.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("grafana/feature-host.json")).unwrap(),
    )
    .unwrap();
    for panel in dash["panels"].as_array().unwrap() {
        assert!(
            !panel["targets"].as_array().unwrap().is_empty(),
            "{}",
            panel["title"]
        );
    }
    // Every alert names a runbook section that exists.
    let guide = std::fs::read_to_string(deploy.join("../docs/operations.md")).unwrap();
    let rules: Value = yaml(&deploy.join("prometheus/alerts.yaml"));
    for rule in rules["groups"][0]["rules"].as_array().unwrap() {
        let runbook = rule["annotations"]["runbook"].as_str().unwrap();
        let anchor = runbook.split_once('#').unwrap().1;
        let has_section = guide.lines().any(|l| {
            l.starts_with('#')
                && l.trim_start_matches('#')
                    .trim()
                    .to_lowercase()
                    .replace(' ', "-")
                    == anchor
        });
        assert!(
            has_section,
            "{} points at a missing runbook section #{anchor}",
            rule["alert"]
        );
    }
}

/// A shared host's pod exposes what it must and holds what it needs: only Prometheus and
/// labelled admin clients reach the admin port, the pod mounts no Kubernetes API token (it
/// calls no Kubernetes API; IRSA's web-identity token is a separate projected volume), the
/// data volume is bounded, and the plugin-sync sidecar assumes its own (read-only) role, not
/// the host's.
#[test]
fn the_pod_is_reachable_and_privileged_only_as_needed() {
    let (k, r) = resources();
    let common = common_labels(&k);
    let pod = &r["Deployment"]["spec"]["template"];
    let pod_labels = labels_of(&pod["metadata"]["labels"], &common);

    let policy = r
        .get("NetworkPolicy")
        .expect("a NetworkPolicy for the admin API");
    assert!(
        selects(&policy["spec"]["podSelector"]["matchLabels"], &pod_labels),
        "the NetworkPolicy does not select the host's pods"
    );
    assert_eq!(
        policy["spec"]["policyTypes"],
        serde_json::json!(["Ingress"])
    );
    let rules = policy["spec"]["ingress"].as_array().expect("ingress rules");
    assert!(!rules.is_empty());
    for rule in rules {
        assert_eq!(
            rule["ports"],
            serde_json::json!([{"port": "admin", "protocol": "TCP"}]),
            "every rule admits the admin port only"
        );
        for from in rule["from"]
            .as_array()
            .expect("each rule names its sources")
        {
            assert!(
                from.get("ipBlock").is_none(),
                "no rule admits addresses: {from}"
            );
        }
    }

    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    let data = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "data")
        .unwrap();
    assert!(
        data["emptyDir"]["sizeLimit"].is_string(),
        "the data emptyDir needs a sizeLimit"
    );

    let containers = pod["spec"]["containers"].as_array().unwrap();
    let role = |c: &Value| {
        c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "AWS_ROLE_ARN")
            .and_then(|e| e["value"].as_str())
            .map(str::to_owned)
    };
    let host_role = r["ServiceAccount"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        .as_str()
        .unwrap()
        .to_owned();
    let sync = containers
        .iter()
        .find(|c| c["name"] == "plugin-sync")
        .expect("the plugin-sync sidecar");
    let sync_role = role(sync).expect("the sidecar sets its own AWS_ROLE_ARN");
    assert_ne!(
        sync_role, host_role,
        "the sidecar must not share the host's role"
    );
    assert!(sync_role.starts_with("arn:aws:iam::"), "{sync_role}");
}

/// Bytes of a Kubernetes memory quantity (`512Mi`, `4Gi`).
fn quantity(q: &str) -> u64 {
    let (n, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("quantity {q}"));
    n * match unit {
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "" => 1,
        other => panic!("unit {other} of {q}"),
    }
}

#[test]
fn a_plugin_compile_at_its_cap_leaves_the_host_its_memory() {
    // The compiler child counts against the pod's memory limit: at its cap, with the host at
    // its request, the pod is still under its limit (else the kernel kills the host).
    let (k, r) = resources();
    let host = &r["Deployment"]["spec"]["template"]["spec"]["containers"][0];
    let request = quantity(host["resources"]["requests"]["memory"].as_str().unwrap());
    let limit = quantity(host["resources"]["limits"]["memory"].as_str().unwrap());
    let cli = feature_host::cli::Cli::command();
    let setting = "FH_PLUGIN_COMPILE_MEMORY_MB";
    let default = cli
        .find_subcommand("run")
        .unwrap()
        .get_arguments()
        .find(|a| a.get_env().is_some_and(|e| e == setting))
        .unwrap_or_else(|| panic!("{setting} is not a setting of `feature-host run`"))
        .get_default_values()[0]
        .to_string_lossy()
        .into_owned();
    let env = host["env"].as_array().unwrap();
    let mb: u64 = config(&k)
        .get(setting)
        .cloned()
        .or_else(|| {
            env.iter()
                .find(|e| e["name"] == setting)
                .and_then(|e| e["value"].as_str().map(str::to_owned))
        })
        .unwrap_or(default)
        .parse()
        .unwrap();
    assert!(
        (mb << 20) + request <= limit,
        "{setting} = {mb} MiB plus the host's request of {request} bytes exceeds the pod's limit \
         of {limit} bytes"
    );
}
