//! Bad input: every malformed or out-of-limit field is answered INVALID_ARGUMENT with a message
//! that starts with the field's name and states the limit, and no Redis key is touched. Every
//! limit is a setting, and every setting is in the README's Configuration table as
//! `latchkey serve --help` states it, and the proto (what `grpcurl describe` shows) names real
//! settings with their real defaults.

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::*;
use fred::prelude::*;
use latchkey::grpc::pb::{self, lock_service_client::LockServiceClient};
use tonic::{Code, Status, transport::Channel};

fn neg(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

fn expect_invalid(
    case: &str,
    result: Result<impl std::fmt::Debug, Status>,
    field: &str,
    words: &str,
) {
    match result {
        Ok(answer) => panic!("{case}: accepted ({answer:?})"),
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
            let message = status.message();
            assert!(
                message.starts_with(&format!("{field}:")),
                "{case}: {message:?} does not name {field}"
            );
            assert!(
                message.contains(words),
                "{case}: {message:?} does not say {words:?}"
            );
        }
    }
}

async fn acquire_with(
    c: &mut LockServiceClient<Channel>,
    m: pb::AcquireRequest,
) -> Result<pb::AcquireResponse, Status> {
    c.acquire(m).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_naming_the_field_and_the_limit_and_touches_no_redis_key() {
    let redis = RedisServer::start();
    let server = Latchkey::start(&redis).await;
    let mut c = server.locks().await;
    let valid = acquire("orders/1", secs(30), Duration::ZERO);
    let token = uuid::Uuid::new_v4().to_string();

    let acquire_cases: Vec<(&str, pb::AcquireRequest, &str, &str)> = vec![
        (
            "empty name",
            pb::AcquireRequest {
                name: String::new(),
                ..valid.clone()
            },
            "name",
            "must not be empty",
        ),
        (
            "257-byte name",
            pb::AcquireRequest {
                name: "x".repeat(257),
                ..valid.clone()
            },
            "name",
            "limit is 256 bytes",
        ),
        (
            "129 two-byte chars",
            pb::AcquireRequest {
                name: "é".repeat(129),
                ..valid.clone()
            },
            "name",
            "258 bytes",
        ),
        (
            "newline in name",
            pb::AcquireRequest {
                name: "a\nb".into(),
                ..valid.clone()
            },
            "name",
            "control characters",
        ),
        (
            "NUL in name",
            pb::AcquireRequest {
                name: "a\0b".into(),
                ..valid.clone()
            },
            "name",
            "control characters",
        ),
        (
            "brace in name",
            pb::AcquireRequest {
                name: "a{b}".into(),
                ..valid.clone()
            },
            "name",
            "'{'",
        ),
        (
            "zero lease",
            pb::AcquireRequest {
                lease: dur(Duration::ZERO),
                ..valid.clone()
            },
            "lease",
            "minimum lease of 10ms",
        ),
        (
            "sub-minimum lease",
            pb::AcquireRequest {
                lease: dur(ms(5)),
                ..valid.clone()
            },
            "lease",
            "min_lease",
        ),
        (
            "negative lease",
            pb::AcquireRequest {
                lease: neg(-1, 0),
                ..valid.clone()
            },
            "lease",
            "negative",
        ),
        (
            "negative nanos",
            pb::AcquireRequest {
                lease: neg(1, -5),
                ..valid.clone()
            },
            "lease",
            "negative",
        ),
        (
            "denormal nanos",
            pb::AcquireRequest {
                lease: neg(1, 1_000_000_000),
                ..valid.clone()
            },
            "lease",
            "nanos",
        ),
        (
            "over-max lease",
            pb::AcquireRequest {
                lease: dur(secs(3601)),
                ..valid.clone()
            },
            "lease",
            "maximum lease of 1h",
        ),
        (
            "huge lease",
            pb::AcquireRequest {
                lease: neg(i64::MAX, 999_999_999),
                ..valid.clone()
            },
            "lease",
            "max_lease",
        ),
        (
            "negative wait",
            pb::AcquireRequest {
                wait_timeout: neg(-3, 0),
                ..valid.clone()
            },
            "wait_timeout",
            "negative",
        ),
        (
            "over-max wait",
            pb::AcquireRequest {
                wait_timeout: dur(secs(301)),
                ..valid.clone()
            },
            "wait_timeout",
            "maximum wait of 5m",
        ),
        (
            "malformed token",
            pb::AcquireRequest {
                token: "hunter2".into(),
                ..valid.clone()
            },
            "token",
            "UUID",
        ),
        (
            "malformed request_id on a re-entry",
            pb::AcquireRequest {
                token: token.clone(),
                request_id: "retry-1".into(),
                ..valid.clone()
            },
            "request_id",
            "must be a UUID",
        ),
        (
            "request_id on a fresh acquire",
            pb::AcquireRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                ..valid.clone()
            },
            "request_id",
            "only a re-entry (with token) takes one",
        ),
    ];
    for (case, request, field, words) in acquire_cases {
        expect_invalid(case, acquire_with(&mut c, request).await, field, words);
    }

    let release = |name: &str, token: &str| pb::ReleaseRequest {
        name: name.into(),
        token: token.into(),
        ..Default::default()
    };
    expect_invalid(
        "release without token",
        c.release(release("orders/1", "")).await,
        "token",
        "required",
    );
    expect_invalid(
        "release bad token",
        c.release(release("orders/1", "42")).await,
        "token",
        "UUID",
    );
    expect_invalid(
        "release empty name",
        c.release(release("", &token)).await,
        "name",
        "empty",
    );
    expect_invalid(
        "release malformed request_id",
        c.release(pb::ReleaseRequest {
            request_id: "1".into(),
            ..release("orders/1", &token)
        })
        .await,
        "request_id",
        "must be a UUID",
    );

    let extend = |lease| pb::ExtendRequest {
        name: "orders/1".into(),
        token: token.clone(),
        lease,
    };
    expect_invalid(
        "extend zero lease",
        c.extend(extend(dur(Duration::ZERO))).await,
        "lease",
        "min_lease",
    );
    expect_invalid(
        "extend over-max lease",
        c.extend(extend(dur(secs(7200)))).await,
        "lease",
        "max_lease",
    );
    expect_invalid(
        "extend without token",
        c.extend(pb::ExtendRequest {
            name: "orders/1".into(),
            token: String::new(),
            lease: None,
        })
        .await,
        "token",
        "required",
    );
    expect_invalid(
        "inspect empty name",
        c.inspect(pb::InspectRequest {
            name: String::new(),
        })
        .await,
        "name",
        "empty",
    );
    expect_invalid(
        "force-release malformed request_id",
        c.force_release(pb::ForceReleaseRequest {
            name: "orders/1".into(),
            request_id: "again".into(),
        })
        .await,
        "request_id",
        "must be a UUID",
    );
    expect_invalid(
        "force-release long name",
        c.force_release(pb::ForceReleaseRequest {
            name: "y".repeat(300),
            ..Default::default()
        })
        .await,
        "name",
        "256",
    );

    // A client built from an incompatible .proto: field 1 (name) sent as a number.
    #[derive(Clone, PartialEq, prost::Message)]
    struct WrongAcquire {
        #[prost(uint64, tag = "1")]
        name: u64,
    }
    let mut raw = tonic::client::Grpc::new(server.channel().await);
    raw.ready().await.unwrap();
    let wrong = raw
        .unary(
            tonic::Request::new(WrongAcquire { name: 7 }),
            "/latchkey.v1.LockService/Acquire".parse().unwrap(),
            tonic_prost::ProstCodec::<WrongAcquire, pb::AcquireResponse>::default(),
        )
        .await;
    expect_invalid(
        "wrong wire type",
        wrong,
        "request",
        "not a valid protobuf message",
    );

    let keys: i64 = redis.client().await.dbsize().await.unwrap();
    assert_eq!(keys, 0, "refused requests must not touch Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_settings_not_constants() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis);
    config.locks.max_name_len = 8;
    config.stock.max_product_id_len = 2; // product locks are named `stock/ID`
    config.locks.max_lease = secs(2);
    config.locks.default_lease = secs(1);
    config.stock.stock_lease = secs(1);
    config.stock.stock_wait = secs(1);
    config.locks.max_wait = secs(1);
    let server = Latchkey::start_with(config).await;
    let mut c = server.locks().await;
    expect_invalid(
        "9-byte name",
        acquire_with(&mut c, acquire("123456789", secs(1), Duration::ZERO)).await,
        "name",
        "limit is 8 bytes",
    );
    expect_invalid(
        "3 s lease",
        acquire_with(&mut c, acquire("a", secs(3), Duration::ZERO)).await,
        "lease",
        "maximum lease of 2s",
    );
    expect_invalid(
        "2 s wait",
        acquire_with(&mut c, acquire("a", secs(1), secs(2))).await,
        "wait_timeout",
        "maximum wait of 1s",
    );
    assert!(
        acquire_with(&mut c, acquire("12345678", secs(2), secs(1)))
            .await
            .unwrap()
            .acquired
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_waiters_or_hold_streams_is_refused_with_resource_exhausted() {
    let redis = RedisServer::start();
    let mut config = test_config(&redis);
    config.locks.max_waiters_per_name = 2;
    config.locks.max_waiters = 3;
    config.locks.max_hold_streams = 1;
    let server = Latchkey::start_with(config).await;
    let mut c = server.locks().await;
    let a = acquire_with(&mut c, acquire("flood/a", secs(30), Duration::ZERO))
        .await
        .unwrap();
    acquire_with(&mut c, acquire("flood/b", secs(30), Duration::ZERO))
        .await
        .unwrap();
    let waiters = |server_client: &LockServiceClient<Channel>, name: &'static str| {
        let mut client = server_client.clone();
        tokio::spawn(async move { client.acquire(acquire(name, secs(30), secs(30))).await })
    };
    let observer = c.clone();
    let w1 = waiters(&c, "flood/a");
    let w2 = waiters(&c, "flood/a");
    wait_for_waiters(&observer, "flood/a", 2, secs(10)).await;
    let status = acquire_with(&mut c, acquire("flood/a", secs(30), secs(30)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_waiters_per_name"),
        "{}",
        status.message()
    );
    // A try-once acquire does not wait, so it is never refused for load.
    assert!(
        !acquire_with(&mut c, acquire("flood/a", secs(30), Duration::ZERO))
            .await
            .unwrap()
            .acquired
    );

    let w3 = waiters(&c, "flood/b");
    wait_for_waiters(&observer, "flood/b", 1, secs(10)).await;
    let status = acquire_with(&mut c, acquire("flood/b", secs(30), secs(30)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("max_waiters"),
        "{}",
        status.message()
    );

    // Capacity comes back as waiters leave: the release hands the lock to one of the two
    // waiters (either), whose release hands it to the other.
    let_go(&c, "flood/a", &a.token).await;
    let (mut w1, mut w2) = (w1, w2);
    let (first, second) = tokio::select! {
        first = &mut w1 => (first, w2),
        first = &mut w2 => (first, w1),
    };
    let granted = first.unwrap().unwrap().into_inner();
    assert!(granted.acquired);
    let_go(&c, "flood/a", &granted.token).await;
    assert!(second.await.unwrap().unwrap().into_inner().acquired);
    w3.abort();
    wait_for_waiters(&observer, "flood/b", 0, secs(10)).await;
    let waiting = waiters(&c, "flood/a");
    wait_for_waiters(&observer, "flood/a", 1, secs(10)).await;
    waiting.abort();

    // Hold streams: one may be open.
    let (first_tx, first_rx) = tokio::sync::mpsc::channel(1);
    first_tx
        .send(pb::HoldRequest {
            action: Some(pb::hold_request::Action::Acquire(acquire(
                "flood/h",
                secs(30),
                Duration::ZERO,
            ))),
        })
        .await
        .unwrap();
    let mut first = c
        .hold(tokio_stream::wrappers::ReceiverStream::new(first_rx))
        .await
        .unwrap()
        .into_inner();
    assert!(first.message().await.unwrap().is_some());
    let (_second_tx, second_rx) = tokio::sync::mpsc::channel(1);
    let status = c
        .hold(tokio_stream::wrappers::ReceiverStream::new(second_rx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("max_hold_streams"),
        "{}",
        status.message()
    );
}

#[test]
fn latchkey_refuses_to_start_with_a_tls_redis_url_instead_of_connecting_in_plain_text() {
    // A latchkey that took the URL would serve until stopped: give it 30 s to refuse.
    let out = latchkey_until_exit(
        &[
            ("LATCHKEY_REDIS_URL", "rediss://127.0.0.1:6380"),
            ("RUST_LOG", "warn"),
        ],
        Duration::from_secs(30),
        "latchkey started with a rediss:// URL",
    );
    // The error is logged to stderr, with every other log line; stdout stays empty.
    let logged = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "latchkey's exit: {logged}");
    assert!(
        logged.contains("--redis-url rediss://") && logged.contains("TLS"),
        "{logged}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "stdout");
}

#[test]
fn latchkey_logs_its_redis_url_without_the_password() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = format!("sqlite://{}", dir.path().join("latchkey.db").display());
    // Nothing listens there: latchkey serves anyway (NOT_SERVING) and logs where it connects.
    let url = format!("redis://:s3cret@127.0.0.1:{}/0", free_port());
    let mut child = latchkey_serve(&[
        ("LATCHKEY_DATABASE_URL", &database),
        ("LATCHKEY_REDIS_URL", &url),
        ("LATCHKEY_REDIS_TIMEOUT", "200ms"),
        ("RUST_LOG", "info"),
    ]);
    let stderr = child.stderr.take().expect("piped stderr");
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        // Up to the health watcher's first verdict, which comes after the serving line.
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let done = line.contains("Redis is unreachable");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !lines.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let logged = lines.join().expect("the log reader").join("\n");
    let without_password = url.replace(":s3cret@", "");
    assert!(
        logged.contains("latchkey serving")
            && logged.contains(&format!("redis={without_password}")),
        "{logged}"
    );
    assert!(logged.contains("Redis is unreachable"), "{logged}");
    assert!(
        !logged.contains("s3cret"),
        "the password was logged: {logged}"
    );
}

/// One setting as documented: its flag, its environment variable, its default and the values
/// it allows (`None` when it has none, or states none).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Setting {
    flag: String,
    env: String,
    default: Option<String>,
    allowed: Option<String>,
}

/// The settings `latchkey serve --help` lists: each option's `--flag <VALUE>` line (with or
/// without a short form), the `Allowed: ...` sentence that ends its help text where it has
/// bounds, and the `[env: NAME=]` and `[default: VALUE]` clap appends. `--help` itself is not a
/// setting.
fn settings_in_help(help: &str) -> Vec<Setting> {
    let mut blocks: Vec<String> = Vec::new();
    for line in help.lines() {
        if line.trim_start().starts_with('-') {
            blocks.push(String::new());
        }
        if let Some(block) = blocks.last_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    blocks
        .iter()
        .filter_map(|block| {
            let flag = block.split_whitespace().find(|w| w.starts_with("--"))?;
            let flag = flag.trim_end_matches(',');
            if flag == "--help" {
                return None;
            }
            let bracket = |tag: &str| {
                let start = block.find(tag)? + tag.len();
                let len = block[start..].find(']')?;
                Some(block[start..start + len].trim_end_matches('=').to_owned())
            };
            let env = bracket("[env: ")
                .unwrap_or_else(|| panic!("{flag} has no environment variable in --help"));
            let allowed = block.find("Allowed: ").map(|start| {
                let rest = &block[start + "Allowed: ".len()..];
                let end = rest.find(" [").unwrap_or(rest.len());
                rest[..end].split_whitespace().collect::<Vec<_>>().join(" ")
            });
            Some(Setting {
                flag: flag.to_owned(),
                env,
                default: bracket("[default: "),
                allowed,
            })
        })
        .collect()
}

/// The rows of the README's Configuration table that name a flag: "| `--flag` / `ENV` |
/// `default` | meaning; allowed: VALUES |", a default of "off" meaning none.
fn settings_in_readme(readme: &str) -> Vec<Setting> {
    let section = common::readme_section(readme, "## Configuration")
        .expect("README has a Configuration section");
    let unquote = |cell: &str| cell.trim().trim_matches('`').to_owned();
    section
        .lines()
        .filter(|line| line.starts_with("| `--"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').collect();
            let (flag, env) = cells[1]
                .split_once(" / ")
                .unwrap_or_else(|| panic!("`--flag` / `ENV` in {line}"));
            let default = unquote(cells[2]);
            let allowed = cells[3]
                .split_once("; allowed: ")
                .map(|(_, values)| values.trim().to_owned());
            Setting {
                flag: unquote(flag),
                env: unquote(env),
                default: (default != "off").then_some(default),
                allowed,
            }
        })
        .collect()
}

/// What the real `latchkey serve --help` prints.
fn serve_help() -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["serve", "--help"])
        .output()
        .expect("run latchkey serve --help");
    assert!(out.status.success(), "latchkey serve --help: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_setting_of_latchkey_serve_is_in_the_readme_configuration_table_with_its_default_and_bounds()
 {
    let from_help: BTreeSet<Setting> = settings_in_help(&serve_help()).into_iter().collect();
    let readme = common::readme();
    let from_readme: BTreeSet<Setting> = settings_in_readme(&readme).into_iter().collect();
    assert!(
        from_help.len() >= 25,
        "parsed too few options: {from_help:#?}"
    );
    let bounded = from_help.iter().filter(|s| s.allowed.is_some()).count();
    assert!(bounded >= 15, "parsed too few bounds: {from_help:#?}");
    // A flag added without a row, a row left for a removed flag, or a default or bound changed
    // on one side only shows up as one entry on each side.
    let undocumented: Vec<_> = from_help.difference(&from_readme).collect();
    let stale: Vec<_> = from_readme.difference(&from_help).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "latchkey serve --help has, the README's Configuration table has not: {undocumented:#?}\n\
         the README has, --help has not: {stale:#?}"
    );
}

/// The text of every `//` comment in the proto files, in order, as one line: what `grpcurl
/// describe` shows callers (a phrase may wrap across comment lines).
fn proto_comments() -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/latchkey/v1");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("read the proto directory")
        .map(|entry| entry.expect("a proto directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "found too few proto files: {files:?}");
    let mut words = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read a proto file");
        for line in text.lines() {
            if let Some((_, comment)) = line.split_once("//") {
                words.extend(comment.split_whitespace().map(str::to_owned));
            }
        }
    }
    words.join(" ")
}

/// The setting a proto comment names: `max_lease` is `--max-lease`.
fn flag_of(setting: &str) -> String {
    format!("--{}", setting.replace('_', "-"))
}

#[test]
fn the_proto_names_real_settings_and_states_their_defaults_as_latchkey_serve_has_them() {
    let help = settings_in_help(&serve_help());
    let default_of = |flag: &str| help.iter().find(|s| s.flag == flag).map(|s| &s.default);
    let comments = proto_comments();
    let identifier = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';

    // "max_lease (1h by default)": the word before the parenthesis is the setting.
    let mut stated = Vec::new();
    for (end, _) in comments.match_indices(" by default)") {
        let open = comments[..end].rfind('(').expect("an opening parenthesis");
        let value = &comments[open + 1..end];
        let before = comments[..open].trim_end();
        let setting = &before[before.rfind(|c: char| !identifier(c)).map_or(0, |i| i + 1)..];
        stated.push((setting.to_owned(), value.to_owned()));
    }
    assert!(
        stated.len() >= 10,
        "found too few stated defaults: {stated:?}"
    );
    let wrong: Vec<String> = stated
        .iter()
        .filter_map(|(setting, value)| match default_of(&flag_of(setting)) {
            Some(Some(default)) if default == value => None,
            Some(default) => Some(format!(
                "{setting}: the proto says {value}, latchkey serve --help {default:?}"
            )),
            None => Some(format!(
                "{setting} ({value} by default) is not a setting of latchkey serve"
            )),
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");

    // Every limit the proto names by its setting's name ("max_wait") is a real setting.
    let named: BTreeSet<&str> = comments
        .split(|c: char| !identifier(c))
        .filter(|word| {
            ["max_", "min_", "default_"]
                .iter()
                .any(|p| word.starts_with(p))
        })
        .collect();
    assert!(named.len() >= 7, "found too few named limits: {named:?}");
    let unknown: Vec<_> = named
        .iter()
        .filter(|setting| default_of(&flag_of(setting)).is_none())
        .collect();
    assert!(
        unknown.is_empty(),
        "the proto names settings latchkey serve does not have: {unknown:?}"
    );
}
