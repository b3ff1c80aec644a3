//! The README's grpcurl transcripts speak the current API. They are real runs, pasted in; this
//! keeps a later change to the proto from leaving them showing a different one: every method
//! they call exists, every field they send or get back is a field of its message, and an answer
//! shown with `-emit-defaults` (which prints every field) shows every field its message has.
//! Every console block starts with the command that printed it. The calls that need no state
//! from before their block (or only the set-up their text describes, which the test makes) are
//! also sent again, to a real latchkey, and must be answered as the README shows: "Bad input"
//! (the very code and message), the Stock walkthrough and the lock walkthrough (each block's
//! calls in order; the very error, or the same JSON, where each token and fence the README
//! shows stands for the one this run got in its place and a TTL may differ by a little), and
//! the Hold streams (message by message; the renewals shown must come on time). Apart
//! from the transcripts, the Operations section's list of metrics must name every metric
//! `src/telemetry.rs` declares.

mod common;

use std::{collections::HashMap, time::Duration};

use prost::Message;
use prost_reflect::{
    DescriptorPool, DynamicMessage, Kind, MessageDescriptor, MethodDescriptor, SerializeOptions,
};
use serde_json::Value;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// The messages and methods latchkey serves: its own proto and gRPC health.
struct Api(DescriptorPool);

impl Api {
    fn load() -> Self {
        let mut pool = DescriptorPool::decode(latchkey::grpc::pb::FILE_DESCRIPTOR_SET)
            .expect("latchkey's descriptor set");
        pool.decode_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .expect("gRPC health's descriptor set");
        Api(pool)
    }

    /// The method a grpcurl command names ("package.Service/Method").
    fn method(&self, full_name: &str) -> Option<MethodDescriptor> {
        let (service, name) = full_name.split_once('/')?;
        self.0
            .get_service_by_name(service)?
            .methods()
            .find(|method| method.name() == name)
    }

    /// Checks `json` against `message`: every key is a field (by its JSON name, or also by its
    /// proto name when `proto_names` is allowed, as grpcurl accepts in requests), nested
    /// messages too; with `every_field`, no field outside a oneof is missing. Returns the
    /// problems found, each naming where.
    fn check(
        &self,
        message: &MessageDescriptor,
        json: &Value,
        proto_names: bool,
        every_field: bool,
        at: &str,
    ) -> Vec<String> {
        let name = message.full_name();
        // Well-known types (Duration) are written as strings, not objects.
        if name.starts_with("google.protobuf.") {
            return Vec::new();
        }
        let Value::Object(object) = json else {
            return vec![format!("{at}: {name} should be a JSON object, is {json}")];
        };
        let mut problems = Vec::new();
        for (key, value) in object {
            // protoc fills in every field's JSON name (lowerCamelCase), as grpcurl prints it.
            let field = message.get_field_by_json_name(key).or_else(|| {
                proto_names
                    .then(|| message.get_field_by_name(key))
                    .flatten()
            });
            let Some(field) = field else {
                problems.push(format!("{at}: {name} has no field {key:?}"));
                continue;
            };
            let Kind::Message(nested) = field.kind() else {
                continue;
            };
            let items: Vec<(String, &Value)> = match (field.is_list(), value) {
                (true, Value::Array(items)) => items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| (format!("{at}.{key}[{i}]"), item))
                    .collect(),
                (_, Value::Null) => Vec::new(),
                _ => vec![(format!("{at}.{key}"), value)],
            };
            for (at, item) in items {
                problems.extend(self.check(&nested, item, proto_names, every_field, &at));
            }
        }
        if every_field {
            for field in message.fields() {
                let key = field.json_name();
                if field.containing_oneof().is_none() && !object.contains_key(key) {
                    problems.push(format!(
                        "{at}: shown with -emit-defaults but without {name}'s field {key:?}"
                    ));
                }
            }
        }
        problems
    }
}

/// One `$ ...grpcurl...` command of a transcript and what it printed.
#[derive(Debug)]
struct Call {
    command: String,
    output: String,
}

/// The text of each of the README's ```console blocks.
fn console_blocks(readme: &str) -> impl Iterator<Item = &str> {
    readme
        .split("```console\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap_or_default())
}

/// Every command in the README's ```console blocks that calls grpcurl, with its output.
fn transcripts(readme: &str) -> Vec<Call> {
    console_blocks(readme).flat_map(calls_in).collect()
}

/// Every command in one console block that calls grpcurl, with its output (the lines up to the
/// next `$ ` line or the block's end).
fn calls_in(block: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut current: Option<Call> = None;
    for line in block.lines() {
        if let Some(command) = line.strip_prefix("$ ") {
            calls.extend(current.take());
            current = command.contains("grpcurl").then(|| Call {
                command: command.to_owned(),
                output: String::new(),
            });
        } else if let Some(call) = current.as_mut() {
            call.output.push_str(line);
            call.output.push('\n');
        }
    }
    calls.extend(current);
    calls
}

/// The ```console blocks that start with output instead of the `$ ` command that printed it:
/// output nobody can check (or rerun).
fn blocks_without_a_command(readme: &str) -> Vec<String> {
    console_blocks(readme)
        .filter_map(|block| {
            let first = block.lines().find(|line| !line.trim().is_empty())?;
            (!first.starts_with("$ ")).then(|| first.to_owned())
        })
        .collect()
}

/// The "package.Service/Method" a grpcurl command calls: its last word, as grpcurl wants it
/// (None for `list` and `describe`).
fn method(command: &str) -> Option<&str> {
    let last = command.split_whitespace().last()?;
    let (service, method) = last.split_once('/')?;
    (service.contains('.') && !method.is_empty()).then_some(last)
}

/// Whether a grpcurl command says `-emit-defaults`: its answers then show every field.
fn emits_defaults(command: &str) -> bool {
    command.contains("-emit-defaults")
}

/// The JSON objects written in single quotes in a command: the request (`-d '...'`), or each
/// message of a stream fed by `echo '...'`.
fn requests(command: &str) -> Vec<Value> {
    command
        .split('\'')
        .skip(1)
        .step_by(2)
        .filter_map(|quoted| serde_json::from_str::<Value>(quoted).ok())
        .filter(Value::is_object)
        .collect()
}

/// The JSON objects a call printed, one per streamed message; an `ERROR:` answer and the
/// shell's `time` output are not JSON and end the list.
fn answers(output: &str) -> Vec<Value> {
    let json: String = output
        .lines()
        .take_while(|line| !line.starts_with("ERROR:") && !line.starts_with("real"))
        .collect::<Vec<_>>()
        .join("\n");
    serde_json::Deserializer::from_str(&json)
        .into_iter::<Value>()
        .map(|value| value.unwrap_or_else(|e| panic!("unreadable JSON in {output:?}: {e}")))
        .collect()
}

/// Every problem of the transcripts in `readme`, and how many calls and answers were checked.
fn problems_in(readme: &str, api: &Api) -> (Vec<String>, usize, usize) {
    let (mut problems, mut calls, mut answered) = (Vec::new(), 0, 0);
    for call in transcripts(readme) {
        let Some(method) = method(&call.command) else {
            continue;
        };
        calls += 1;
        let Some(described) = api.method(method) else {
            problems.push(format!("`{}`: no method {method}", call.command));
            continue;
        };
        let (input, output) = (described.input(), described.output());
        for request in requests(&call.command) {
            problems.extend(api.check(&input, &request, true, false, &call.command));
        }
        let every_field = emits_defaults(&call.command);
        for answer in answers(&call.output) {
            answered += 1;
            problems.extend(api.check(&output, &answer, false, every_field, &call.command));
        }
    }
    for first in blocks_without_a_command(readme) {
        problems.push(format!(
            "a console block starts with {first:?}, not with the `$ ` command that printed it"
        ));
    }
    (problems, calls, answered)
}

#[test]
fn the_readme_grpcurl_transcripts_use_only_methods_and_fields_the_api_has() {
    let api = Api::load();
    let (problems, calls, answered) = problems_in(&common::readme(), &api);
    // The README walks through every RPC; far fewer calls means the parsing broke.
    assert!(
        calls >= 30 && answered >= 25,
        "found only {calls} calls and {answered} answers"
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn a_transcript_missing_a_field_naming_an_unknown_one_or_without_its_command_is_caught() {
    let api = Api::load();
    let transcript =
        |command: &str, output: &str| format!("```console\n$ {command}\n{output}```\n");
    let acquire = "grpcurl -plaintext -emit-defaults -d '{\"name\": \"a\", \"wait_timeout\": \"2s\"}' \
                   localhost:50051 latchkey.v1.LockService/Acquire";
    let all_fields = r#"{
  "acquired": false, "token": "", "fence": "0", "lease": null, "holdCount": 0,
  "holderTtl": "27.581s", "queuedAt": "0"
}
"#;
    let (problems, ..) = problems_in(&transcript(acquire, all_fields), &api);
    assert!(problems.is_empty(), "{problems:#?}");

    let without_queued_at = all_fields.replace(r#", "queuedAt": "0""#, "");
    let (problems, ..) = problems_in(&transcript(acquire, &without_queued_at), &api);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].contains("\"queuedAt\""), "{problems:#?}");

    let renamed = all_fields.replace("holdCount", "holds");
    let (problems, ..) = problems_in(&transcript(acquire, &renamed), &api);
    assert!(
        problems.iter().any(|p| p.contains("no field \"holds\"")),
        "{problems:#?}"
    );

    let bad_request = acquire.replace("wait_timeout", "wait_ms");
    let (problems, ..) = problems_in(&transcript(&bad_request, all_fields), &api);
    assert!(
        problems.iter().any(|p| p.contains("no field \"wait_ms\"")),
        "{problems:#?}"
    );

    let nested = "grpcurl -plaintext -d '{\"order_id\": \"o\", \"items\": [{\"product_id\": \"p\", \"qty\": 1}]}' \
                  localhost:50051 latchkey.v1.StockService/ReduceStock";
    let (problems, ..) = problems_in(&transcript(nested, "ERROR:\n  Code: NotFound\n"), &api);
    assert!(
        problems.iter().any(|p| p.contains("no field \"qty\"")),
        "{problems:#?}"
    );

    let (problems, ..) = problems_in(&format!("```console\n{all_fields}```\n"), &api);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("not with the `$ ` command")),
        "{problems:#?}"
    );

    let gone = acquire.replace("LockService/Acquire", "LockService/Grab");
    let (problems, ..) = problems_in(&transcript(&gone, all_fields), &api);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("no method latchkey.v1.LockService/Grab")),
        "{problems:#?}"
    );
}

/// The code and message of an `ERROR:` answer as grpcurl prints it, or None for an answer.
fn shown_error(output: &str) -> Option<(String, String)> {
    let rest = output.trim_start().strip_prefix("ERROR:")?;
    let field = |name: &str| {
        rest.lines()
            .find_map(|line| line.trim().strip_prefix(name))
            .map(|value| value.trim().to_owned())
    };
    Some((field("Code:")?, field("Message:").unwrap_or_default()))
}

/// `json` with every google.protobuf.Duration of message `desc` written the canonical way
/// ("7200s"). grpcurl also takes a duration written as Go writes one ("2h"), as the README does;
/// prost-reflect takes only the canonical form.
fn canonical_durations(desc: &MessageDescriptor, json: &Value) -> Value {
    let Value::Object(object) = json else {
        return json.clone();
    };
    let mut out = object.clone();
    for (key, value) in &mut out {
        let Some(field) = desc
            .get_field_by_json_name(key)
            .or_else(|| desc.get_field_by_name(key))
        else {
            continue;
        };
        let Kind::Message(inner) = field.kind() else {
            continue;
        };
        let canonical = match &*value {
            Value::String(text) if inner.full_name() == "google.protobuf.Duration" => {
                match humantime::parse_duration(text) {
                    Ok(d) => Value::String(format!("{}.{:09}s", d.as_secs(), d.subsec_nanos())),
                    Err(_) => value.clone(),
                }
            }
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| canonical_durations(&inner, item))
                    .collect(),
            ),
            other => canonical_durations(&inner, other),
        };
        *value = canonical;
    }
    Value::Object(out)
}

/// A gRPC codec for messages known only from their descriptors, as grpcurl knows them:
/// requests are encoded as any protobuf message, answers decoded as the method's output.
struct DynamicCodec(MessageDescriptor);
struct DynamicEncoder;
struct DynamicDecoder(MessageDescriptor);

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> DynamicEncoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> DynamicDecoder {
        DynamicDecoder(self.0.clone())
    }
}

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = tonic::Status;

    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(dst)
            .map_err(|e| tonic::Status::internal(format!("encoding the request: {e}")))
    }
}

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Self::Error> {
        DynamicMessage::decode(self.0.clone(), src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("decoding the answer: {e}")))
    }
}

/// `request`, grpcurl's JSON, as the protobuf message `input` of `method`.
fn to_message(input: &MessageDescriptor, method: &str, request: &Value) -> DynamicMessage {
    DynamicMessage::deserialize(input.clone(), canonical_durations(input, request))
        .unwrap_or_else(|e| panic!("{method}: request {request} does not parse: {e}"))
}

/// `answer` as grpcurl prints it: 64-bit integers as strings, fields at their default value
/// left out unless `emit_defaults` (then shown, but for a message field not set, which grpcurl
/// prints as `null`).
fn to_json(answer: &DynamicMessage, emit_defaults: bool) -> Value {
    let options = SerializeOptions::new().skip_default_fields(!emit_defaults);
    answer
        .serialize_with_options(serde_json::value::Serializer, &options)
        .expect("an answer serializes to JSON")
}

/// A ready gRPC client on `channel` for `method` ("package.Service/Method"), with the method's
/// descriptor and its path.
async fn client_for(
    channel: tonic::transport::Channel,
    api: &Api,
    method: &str,
) -> (
    MethodDescriptor,
    tonic::client::Grpc<tonic::transport::Channel>,
    http::uri::PathAndQuery,
) {
    let described = api
        .method(method)
        .unwrap_or_else(|| panic!("no method {method}"));
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("latchkey ready");
    let path = format!("/{method}").parse().expect("a gRPC path");
    (described, grpc, path)
}

/// Sends `request` (grpcurl's JSON) to `method` ("package.Service/Method") as its protobuf
/// message, the way grpcurl does, and gives back the answer as grpcurl prints it.
async fn call_with_json(
    channel: tonic::transport::Channel,
    api: &Api,
    method: &str,
    request: &Value,
    emit_defaults: bool,
) -> Result<Value, tonic::Status> {
    let (described, mut grpc, path) = client_for(channel, api, method).await;
    let message = to_message(&described.input(), method, request);
    let answer = grpc
        .unary(
            tonic::Request::new(message),
            path,
            DynamicCodec(described.output()),
        )
        .await?
        .into_inner();
    Ok(to_json(&answer, emit_defaults))
}

/// A bidirectional stream opened the way grpcurl opens one with `-d @`: each message sent as
/// grpcurl's JSON, each answer given back as grpcurl prints it (with every field when the
/// command says `-emit-defaults`, as in the unary replay).
struct JsonStream {
    method: String,
    emit_defaults: bool,
    input: MessageDescriptor,
    requests: Option<tokio::sync::mpsc::Sender<DynamicMessage>>,
    answers: tonic::Streaming<DynamicMessage>,
}

impl JsonStream {
    /// The stream the grpcurl `command` opens.
    async fn open(channel: tonic::transport::Channel, api: &Api, command: &str) -> Self {
        let method = method(command).expect("a grpcurl call of a method");
        let (described, mut grpc, path) = client_for(channel, api, method).await;
        let (requests, outgoing) = tokio::sync::mpsc::channel(4);
        let answers = grpc
            .streaming(
                tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outgoing)),
                path,
                DynamicCodec(described.output()),
            )
            .await
            .unwrap_or_else(|status| panic!("{method}: the stream did not open: {status:?}"))
            .into_inner();
        JsonStream {
            method: method.to_owned(),
            emit_defaults: emits_defaults(command),
            input: described.input(),
            requests: Some(requests),
            answers,
        }
    }

    async fn send(&self, request: &Value) {
        let message = to_message(&self.input, &self.method, request);
        let requests = self.requests.as_ref().expect("the input is still open");
        requests
            .send(message)
            .await
            .expect("the stream takes input");
    }

    /// Ends the input, as grpcurl does when the `echo`s are done.
    fn close_input(&mut self) {
        self.requests = None;
    }

    /// The next answer, or None once latchkey ended the stream (with OK; any other status
    /// fails the test).
    async fn next(&mut self) -> Option<Value> {
        let answer =
            self.answers.message().await.unwrap_or_else(|status| {
                panic!("{}: the stream failed: {status:?}", self.method)
            })?;
        Some(to_json(&answer, self.emit_defaults))
    }
}

#[tokio::test]
async fn the_readme_bad_input_answers_are_what_latchkey_answers() {
    let readme = common::readme();
    let blocks = blocks_under(&readme, "### Bad input");
    let calls: Vec<Call> = blocks.iter().flat_map(|block| calls_in(block)).collect();
    assert!(
        calls.len() >= 3,
        "found only {} calls: {calls:#?}",
        calls.len()
    );
    for call in &calls {
        assert!(
            shown_error(&call.output).is_some(),
            "`{}` shows no ERROR answer",
            call.command
        );
    }

    let redis = common::RedisServer::start();
    let server = common::Latchkey::start(&redis).await;
    let (api, channel) = (Api::load(), server.channel().await);
    let mut stand = Stand::default();
    for block in blocks {
        replay(block, &channel, &api, &mut stand).await;
    }
}

/// How far a TTL latchkey reads off its clock may be from the README's: the README's calls
/// were typed by hand, seconds apart, the test's follow each other at once.
const CLOCK_SLACK: Duration = Duration::from_millis(2500);

/// The README's values that stand for values that differ from run to run: each token and
/// fence the README shows stands for the one latchkey gave in its place, the same wherever
/// it appears again.
#[derive(Default)]
struct Stand(HashMap<String, String>);

impl Stand {
    /// `request` with every token the README showed replaced by this run's.
    fn request(&self, request: &Value) -> Value {
        let mut request = request.clone();
        if let Some(Value::String(token)) = request.get_mut("token")
            && let Some(ours) = self.0.get(token.as_str())
        {
            *token = ours.clone();
        }
        request
    }

    /// What differs between the answer the README `shown` and latchkey's `actual` one, keys
    /// and values, but for tokens and fences that stand for this run's (learned here on first
    /// sight) and TTLs within `CLOCK_SLACK`.
    fn differences(&mut self, shown: &Value, actual: &Value, at: &str) -> Vec<String> {
        match (shown, actual) {
            (Value::Object(shown), Value::Object(actual)) => {
                let mut keys: Vec<&String> = shown.keys().chain(actual.keys()).collect();
                keys.sort();
                keys.dedup();
                let mut differences = Vec::new();
                for key in keys {
                    let at = format!("{at}.{key}");
                    match (shown.get(key), actual.get(key)) {
                        (Some(shown), Some(actual)) => {
                            differences.extend(self.value_differs(key, shown, actual, &at))
                        }
                        // `-emit-defaults` shows a message field not set as null.
                        (Some(Value::Null), None) => {}
                        (Some(_), None) => differences.push(format!("{at}: shown, not answered")),
                        (None, Some(_)) => differences.push(format!("{at}: answered, not shown")),
                        (None, None) => {}
                    }
                }
                differences
            }
            (Value::Array(shown), Value::Array(actual)) if shown.len() == actual.len() => shown
                .iter()
                .zip(actual)
                .enumerate()
                .flat_map(|(i, (shown, actual))| {
                    self.differences(shown, actual, &format!("{at}[{i}]"))
                })
                .collect(),
            _ if shown == actual => Vec::new(),
            _ => vec![format!("{at}: shown {shown}, answered {actual}")],
        }
    }

    /// Fails the test unless latchkey's `answer` to `command` is the README's `shown` one.
    fn assert_shown(&mut self, command: &str, shown: &Value, answer: &Value) {
        let differences = self.differences(shown, answer, "answer");
        assert!(
            differences.is_empty(),
            "`{command}`: latchkey answered {answer}, not the README's answer: {differences:#?}"
        );
    }

    fn value_differs(&mut self, key: &str, shown: &Value, actual: &Value, at: &str) -> Vec<String> {
        if let (Value::String(shown_text), Value::String(actual_text)) = (shown, actual) {
            let unset = shown_text.is_empty() || shown_text == "0";
            if matches!(key, "token" | "fence") && !unset {
                if let Some(ours) = self.0.get(shown_text) {
                    return if ours == actual_text {
                        Vec::new()
                    } else {
                        vec![format!(
                            "{at}: {shown_text} stood for {ours} before, now {actual_text}"
                        )]
                    };
                }
                // A new value in the README must be a new value in this run, too.
                if let Some((before, _)) = self.0.iter().find(|(_, ours)| *ours == actual_text) {
                    return vec![format!(
                        "{at}: shown {shown_text}, answered {actual_text}, which {before} stood for"
                    )];
                }
                self.0.insert(shown_text.clone(), actual_text.clone());
                return Vec::new();
            }
            // A TTL read off a clock has a fraction; a lease as granted does not.
            if let (Some(shown_ttl), Some(actual_ttl)) = (
                shown_text.strip_suffix('s').filter(|t| t.contains('.')),
                actual_text.strip_suffix('s'),
            ) && let (Ok(shown_ttl), Ok(actual_ttl)) =
                (shown_ttl.parse::<f64>(), actual_ttl.parse::<f64>())
            {
                return if (shown_ttl - actual_ttl).abs() <= CLOCK_SLACK.as_secs_f64() {
                    Vec::new()
                } else {
                    vec![format!("{at}: shown {shown_text}, answered {actual_text}")]
                };
            }
        }
        self.differences(shown, actual, at)
    }
}

/// Sends the calls of one console block again, in order, and fails the test unless each
/// answer is the README's: the same error code and message, or the same JSON (as grpcurl
/// prints it, under `stand`'s rules). Returns how many calls it checked.
async fn replay(
    block: &str,
    channel: &tonic::transport::Channel,
    api: &Api,
    stand: &mut Stand,
) -> usize {
    let calls = calls_in(block);
    for call in &calls {
        let method = method(&call.command).expect("a grpcurl call of a method");
        let [request] = requests(&call.command)
            .try_into()
            .unwrap_or_else(|found: Vec<Value>| {
                panic!("`{}` sends {} requests, not one", call.command, found.len())
            });
        let emit_defaults = emits_defaults(&call.command);
        let request = stand.request(&request);
        let answer = call_with_json(channel.clone(), api, method, &request, emit_defaults).await;
        match (shown_error(&call.output), answer) {
            (Some((code, message)), Err(status)) => assert_eq!(
                (format!("{:?}", status.code()), status.message()),
                (code, message.as_str()),
                "`{}`: latchkey's error (left) is not the README's (right)",
                call.command
            ),
            (None, Ok(answer)) => {
                let [shown] =
                    answers(&call.output)
                        .try_into()
                        .unwrap_or_else(|found: Vec<Value>| {
                            panic!("`{}` shows {} answers, not one", call.command, found.len())
                        });
                stand.assert_shown(&call.command, &shown, &answer);
            }
            (shown, answer) => panic!(
                "`{}`: the README shows {}, latchkey answered {answer:?}",
                call.command,
                shown.map_or("an answer".to_owned(), |(code, _)| format!("error {code}"))
            ),
        }
    }
    calls.len()
}

/// The console blocks of the README section under `heading` (up to the next heading).
fn blocks_under<'a>(readme: &'a str, heading: &str) -> Vec<&'a str> {
    let section = common::readme_section(readme, heading)
        .and_then(|rest| rest.split("\n### ").next())
        .unwrap_or_else(|| panic!("the README has no section {heading:?}"));
    console_blocks(section).collect()
}

/// The Stock section's walkthrough makes its own products, so it is run again, call by call
/// and in order, on a fresh latchkey; every answer must be the README's, JSON for JSON (as
/// grpcurl prints it) or code and message for an error. Its second block runs while the test
/// holds `stock/sku-2`, as the README's text before it says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_stock_walkthrough_is_what_latchkey_answers() {
    let readme = common::readme();
    let heading = "### Stock: SetStock, ReduceStock (success, replay, insufficient), RestoreStock";
    let blocks = blocks_under(&readme, heading);
    assert_eq!(
        blocks.len(),
        2,
        "expected the walkthrough and the held-lock call"
    );
    assert!(
        readme.contains("While someone holds `stock/sku-2`"),
        "the second block's set-up is no longer the one this test makes"
    );

    let redis = common::RedisServer::start();
    let server = common::Latchkey::start(&redis).await;
    let (api, channel) = (Api::load(), server.channel().await);
    let mut stand = Stand::default();
    let mut checked = replay(blocks[0], &channel, &api, &mut stand).await;
    let locks = server.locks().await;
    let _held = common::take(&locks, "stock/sku-2", Duration::from_secs(60)).await;
    checked += replay(blocks[1], &channel, &api, &mut stand).await;
    assert!(checked >= 10, "checked only {checked} calls");
}

/// The lock walkthrough's blocks run again the same way: acquire, wait, re-enter, inspect,
/// extend, release; each re-entry and release sent twice, as a retry; and a wait of up to 20 s
/// that the holder's release (here the test's, a second after the wait began, as in the README)
/// ends. Tokens and fences are this run's, and TTLs within `CLOCK_SLACK` of the README's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_lock_walkthrough_is_what_latchkey_answers() {
    let readme = common::readme();
    let blocks = blocks_under(
        &readme,
        "### Acquire, wait, re-enter, inspect, extend, release",
    );
    assert_eq!(blocks.len(), 3, "expected three console blocks");

    let redis = common::RedisServer::start();
    let server = common::Latchkey::start(&redis).await;
    let (api, channel) = (Api::load(), server.channel().await);
    let mut stand = Stand::default();
    let mut checked = 0;
    for block in &blocks[..2] {
        checked += replay(block, &channel, &api, &mut stand).await;
    }

    // Terminal 1 holds orders/7 and releases it a second after terminal 2 starts waiting.
    assert!(
        blocks[2].contains("orders/7") && readme.contains("Terminal 1 holds `orders/7`"),
        "the third block's set-up is no longer the one this test makes"
    );
    let locks = server.locks().await;
    let held = common::take(&locks, "orders/7", Duration::from_secs(60)).await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        common::let_go(&locks, "orders/7", &held.token).await;
    });
    let started = std::time::Instant::now();
    checked += replay(blocks[2], &channel, &api, &mut stand).await;
    let waited = started.elapsed();
    release.await.expect("terminal 1 released");
    assert!(
        waited < Duration::from_secs(10),
        "the waiter had the lock after {waited:?}: not woken by the release a second in"
    );
    assert!(checked >= 16, "checked only {checked} calls");
    assert!(
        stand.0.len() >= 4,
        "learned too few tokens and fences: {:?}",
        stand.0
    );
}

/// The Hold section's streams run again the same way, message by message. The first takes a lock
/// with a short lease and releases it after a `sleep`; latchkey renews every lease/3, so the README
/// shows as many renewals as fit in that sleep. The test sends the release once those renewals have
/// arrived (a fixed sleep on a loaded machine could catch one renewal more or less) and checks that
/// they came on time instead: the k-th nearer k x lease/3 after the grant than either neighbouring
/// slot, (k - 1) or (k + 1) x lease/3. The second stream stays open until an operator's
/// ForceRelease (the third block, sent a second in, as the README's text says) takes its lock:
/// `lost` must come within `CLOCK_SLACK` of it, not at the next renewal 10 s on, and end the stream
/// while the input is still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_hold_streams_are_what_latchkey_answers() {
    let readme = common::readme();
    let blocks = blocks_under(&readme, "### Hold: keep a lock while a stream is open");
    assert_eq!(
        blocks.len(),
        3,
        "expected the released stream, the lost stream and the ForceRelease"
    );
    let redis = common::RedisServer::start();
    let server = common::Latchkey::start(&redis).await;
    let (api, channel) = (Api::load(), server.channel().await);
    let mut stand = Stand::default();

    // Acquire, renewals, release.
    let [call] = calls_in(blocks[0]).try_into().expect("one Hold call");
    let [acquire, release] = requests(&call.command)
        .try_into()
        .expect("an acquire and a release message");
    let lease = acquire["acquire"]["lease"]
        .as_str()
        .and_then(|lease| humantime::parse_duration(lease).ok())
        .expect("the acquire asks for a lease");
    let every = lease / 3;
    let sleep = call
        .command
        .split("sleep ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|seconds| seconds.trim().parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .expect("a sleep before the release");
    let shown = answers(&call.output);
    let Some((shown_grant, [shown_renewals @ .., shown_release])) = shown.split_first() else {
        panic!("expected acquired, renewed..., released: {shown:#?}");
    };
    assert!(
        shown_grant.get("acquired").is_some()
            && shown_renewals.iter().all(|a| a.get("renewed").is_some())
            && shown_release.get("released").is_some(),
        "expected acquired, renewed..., released: {shown:#?}"
    );
    assert_eq!(
        shown_renewals.len() as u32,
        sleep.div_duration_f64(every).floor() as u32,
        "the README shows {} renewals in a {sleep:?} sleep, at one per {every:?}",
        shown_renewals.len()
    );

    let mut stream = JsonStream::open(channel.clone(), &api, &call.command).await;
    stream.send(&acquire).await;
    let granted = stream.next().await.expect("an answer to the acquire");
    let granted_at = std::time::Instant::now();
    stand.assert_shown(&call.command, shown_grant, &granted);
    for (k, shown) in (1u32..).zip(shown_renewals) {
        let renewed = stream.next().await.expect("a renewal");
        let after = granted_at.elapsed();
        stand.assert_shown(&call.command, shown, &renewed);
        let due = every * k;
        assert!(
            after + every / 2 > due && after < due + every / 2,
            "renewal {k} came {after:?} after the grant, not about {due:?}"
        );
    }
    stream.send(&release).await;
    stream.close_input();
    let released = stream.next().await.expect("an answer to the release");
    stand.assert_shown(&call.command, shown_release, &released);
    let more = stream.next().await;
    assert_eq!(more, None, "the stream goes on after release");

    // A Hold that an operator's ForceRelease takes the lock from.
    assert!(
        readme.contains("terminal, a second later:"),
        "the ForceRelease's set-up is no longer the one this test makes"
    );
    let [call] = calls_in(blocks[1]).try_into().expect("one Hold call");
    let [acquire] = requests(&call.command)
        .try_into()
        .expect("an acquire message");
    let [shown_grant, shown_lost] = answers(&call.output).try_into().expect("acquired and lost");
    let mut stream = JsonStream::open(channel.clone(), &api, &call.command).await;
    stream.send(&acquire).await;
    let granted = stream.next().await.expect("an answer to the acquire");
    stand.assert_shown(&call.command, &shown_grant, &granted);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(replay(blocks[2], &channel, &api, &mut stand).await, 1);
    let force_released = std::time::Instant::now();
    let lost = stream.next().await.expect("lost");
    let waited = force_released.elapsed();
    stand.assert_shown(&call.command, &shown_lost, &lost);
    assert!(
        waited <= CLOCK_SLACK,
        "lost came {waited:?} after the ForceRelease, not at once"
    );
    let more = stream.next().await;
    assert_eq!(more, None, "the stream goes on after lost");
}

/// Every metric latchkey records: the `pub const NAME: &str = "latchkey_..."` lines of
/// `src/telemetry.rs`, where each one is declared.
fn metrics_declared() -> Vec<String> {
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/telemetry.rs"))
        .expect("read src/telemetry.rs");
    source
        .lines()
        .filter(|line| line.starts_with("pub const ") && line.contains(": &str = \"latchkey_"))
        .filter_map(|line| line.split('"').nth(1).map(str::to_owned))
        .collect()
}

#[test]
fn every_metric_latchkey_records_is_listed_under_operations() {
    let metrics = metrics_declared();
    assert!(metrics.len() >= 10, "found too few metrics: {metrics:?}");
    let readme = common::readme();
    let operations =
        common::readme_section(&readme, "## Operations").expect("README has an Operations section");
    let listed = operations
        .split("\n- ")
        .find(|bullet| bullet.starts_with("**Metrics**"))
        .expect("Operations has a Metrics bullet");
    let missing: Vec<_> = metrics
        .iter()
        .filter(|name| {
            !listed.contains(&format!("`{name}`")) && !listed.contains(&format!("`{name}{{"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "metrics missing from the README's Operations list: {missing:?}"
    );
}
