//! Kafka security end to end, as far as a local broker goes: a broker of the test's own with
//! a SASL_SSL listener (SCRAM-SHA-512, a CA and broker certificate made by the test with
//! `openssl`) and a SASL_PLAINTEXT listener with OAUTHBEARER (Kafka's unsecured-JWS
//! validator, connections re-authenticated every few seconds). The host consumes and
//! republishes (a dead letter) through each with the settings users set
//! (`FH_KAFKA_PROPERTIES`, `FH_KAFKA_AUTH`), and the OAUTHBEARER token-refresh path — the one
//! MSK IAM tokens take — is exercised against the broker. (Nothing local validates MSK IAM's
//! SigV4 tokens; their signing is unit-tested in `stream::msk_iam`.)

use feature_host_e2e::delivery::*;
use feature_host_e2e::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const USER: &str = "alice";

/// Each test runs a broker and a host: one at a time on 2 cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const PASSWORD: &str = "alice-scram-secret";

/// A CA and a certificate for 127.0.0.1 signed by it, in a PKCS#12 keystore for the broker.
fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (scripts/stack install)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=feature-host test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "broker.key",
        "-out",
        "broker.csr",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "broker.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "broker.crt",
    ]);
    run(&[
        "pkcs12",
        "-export",
        "-in",
        "broker.crt",
        "-inkey",
        "broker.key",
        "-out",
        "broker.p12",
        "-passout",
        "pass:keystore-secret",
    ]);
}

/// A broker with a `SCRAM` (SASL_SSL, SCRAM-SHA-512) and an `OAUTH` (SASL_PLAINTEXT,
/// OAUTHBEARER) listener besides PLAINTEXT; connections must re-authenticate every 3 s.
fn secure_broker(dir: &Path) -> OwnKafka {
    std::fs::create_dir_all(dir).unwrap();
    certificates(dir);
    let keystore = dir.join("broker.p12");
    let config = dir.join("security.properties");
    std::fs::write(
        &config,
        format!(
            "sasl.enabled.mechanisms=SCRAM-SHA-512,OAUTHBEARER
connections.max.reauth.ms=3000
listener.name.scram.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.scram.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.scram.ssl.keystore.type=PKCS12
listener.name.scram.ssl.keystore.location={}
listener.name.scram.ssl.keystore.password=keystore-secret
listener.name.scram.ssl.key.password=keystore-secret
listener.name.oauth.sasl.enabled.mechanisms=OAUTHBEARER
listener.name.oauth.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required unsecuredLoginStringClaim_sub=\"broker\";
",
            keystore.display()
        ),
    )
    .unwrap();
    let scram = format!("SCRAM-SHA-512=[name={USER},password={PASSWORD}]");
    OwnKafka::start(
        &dir.join("kafka"),
        1,
        &[
            "--listener",
            "SCRAM=SASL_SSL",
            "--listener",
            "OAUTH=SASL_PLAINTEXT",
            "--config",
            config.to_str().unwrap(),
            "--scram",
            &scram,
        ],
    )
}

/// Produces over PLAINTEXT (the test's side), consumes and republishes over `brokers` with
/// `auth` (the host's side): every click counted, the poison event dead-lettered, every
/// offset committed. Returns the host's metrics and its output.
async fn through(
    kafka: &OwnKafka,
    brokers: String,
    auth: &[(&'static str, String)],
    n: usize,
    pause: Duration,
) -> String {
    let plain = Stack {
        kafka: kafka.brokers.clone(),
        ..Stack::from_env()
    };
    let s = Setup::clicks(plain, 1).await;
    let group_id = format!("secure-{}", s.id);
    let port = free_port();
    let mut env = s.env(&group_id, "data");
    env.retain(|(k, _)| *k != "FH_KAFKA_BROKERS" && *k != "FH_ADMIN_ADDR");
    env.push(("FH_KAFKA_BROKERS", brokers));
    env.push(("FH_ADMIN_ADDR", format!("127.0.0.1:{port}")));
    env.extend(auth.iter().cloned());
    let host = Host::spawn(&["run"], &env);
    produce_clicks(&s.stack, &s.topic, 0..n, pause).await;
    let p = s.stack.producer();
    produce(&p, &s.topic, "u0", click_time(n), "not json", &[]).await;
    s.assert_exact_counts(&expected(n)).await;
    let dlq = format!("{}.dlq", s.group);
    eventually(Duration::from_secs(60), "the dead letter", || async {
        (s.stack.read_all(&dlq).len() == 1).then_some(())
    })
    .await;
    let metrics = http_get(port, "/metrics").await.expect("metrics served");
    s.stop_committed(host, &group_id, 1, n + 1);
    metrics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_consumes_and_republishes_over_sasl_ssl_scram_and_oauthbearer() {
    let _serial = SERIAL.lock().await;
    let dir = std::env::temp_dir().join(format!("fh-kafka-sec-{}", unique()));
    let kafka = secure_broker(&dir);
    let ca = dir.join("ca.crt").display().to_string();

    // SASL_SSL + SCRAM-SHA-512, the broker's certificate checked against the test's CA.
    let scram = format!(
        "security.protocol=SASL_SSL,sasl.mechanisms=SCRAM-SHA-512,sasl.username={USER},sasl.password={PASSWORD},ssl.ca.location={ca}"
    );
    through(
        &kafka,
        kafka.var("FH_KAFKA_SCRAM_BROKERS"),
        &[("FH_KAFKA_PROPERTIES", scram)],
        200,
        Duration::ZERO,
    )
    .await;

    // OAUTHBEARER through the host's token callback, tokens valid for 10 s: over ~20 s of
    // traffic librdkafka asks each client for new ones (at 80 % of the lifetime, on a 1 s
    // timer), and the broker re-authenticates every connection every 3 s with the current
    // one. A refresh that failed would cut the host off. (Much shorter lifetimes race
    // librdkafka's 1 s refresh timer: a token can expire before it is replaced.)
    let metrics = through(
        &kafka,
        kafka.var("FH_KAFKA_OAUTH_BROKERS"),
        &[
            ("FH_KAFKA_AUTH", "oauth-unsecured".into()),
            ("FH_KAFKA_OAUTH_LIFETIME", "10s".into()),
        ],
        500,
        Duration::from_millis(40),
    )
    .await;
    let issued = metric(&metrics, "fh_kafka_oauth_tokens_total");
    assert!(
        issued >= 6.0,
        "tokens were refreshed while the host ran (one per client at start, then every ~8 s): {issued}\n{metrics}"
    );
    assert_eq!(metric(&metrics, "fh_kafka_oauth_token_failures_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_scram_password_stops_the_host_with_a_clear_error_that_hides_the_password() {
    let _serial = SERIAL.lock().await;
    let dir = std::env::temp_dir().join(format!("fh-kafka-sec-{}", unique()));
    let kafka = secure_broker(&dir);
    let ca = dir.join("ca.crt").display().to_string();
    let s = Setup::clicks(
        Stack {
            kafka: kafka.brokers.clone(),
            ..Stack::from_env()
        },
        1,
    )
    .await;
    let wrong = "not-the-password-0451";
    let mut env = s.env(&format!("wrong-{}", s.id), "data");
    env.retain(|(k, _)| *k != "FH_KAFKA_BROKERS");
    env.push(("FH_KAFKA_BROKERS", kafka.var("FH_KAFKA_SCRAM_BROKERS")));
    env.push((
        "FH_KAFKA_PROPERTIES",
        format!(
            "security.protocol=SASL_SSL,sasl.mechanisms=SCRAM-SHA-512,sasl.username={USER},sasl.password={wrong},ssl.ca.location={ca}"
        ),
    ));
    let log = dir.join("host.log");
    let mut child = std::process::Command::new(host_binary())
        .arg("run")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("host.err")).unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the host did not give up within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let text = std::fs::read_to_string(dir.join("host.err")).unwrap()
        + &std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "the host must not start:\n{text}");
    assert!(
        text.contains("Authentication failed") || text.contains("SASL authentication error"),
        "the error names the cause:\n{text}"
    );
    assert!(
        !text.contains(wrong),
        "the password leaked into the output:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&s.tmp);
}
