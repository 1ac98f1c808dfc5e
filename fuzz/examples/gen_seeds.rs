//! Writes the seed inputs under `fuzz/corpus/<target>/` with the real encoders:
//! `cargo run --example gen_seeds` (from `fuzz/`). Small files only; rerun after format changes.

use starcite_cluster::node_log::NodeLog;
use starcite_cluster::rpc::{ClientOp, ClientReply, Frame, Request, Response};
use starcite_cluster::state_machine::encode_state;
use starcite_core::{AppendCommand, AppendRequest, Command, CreateCommand, CreateRequest};
use starcite_core::{GroupState, SessionId, Timestamp};
use starcite_raft::{Entry, HardState, Message};
use starcite_storage::{decode_frames, encode_frame};
use std::path::Path;

type Done = Box<dyn FnOnce(Result<(), starcite_storage::StorageError>) + Send>;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

const APPENDS: &[&str] = &[
    r#"{"type":"t","payload":{},"actor":"a"}"#,
    r#"{"type":"state","payload":{"b":1, "a":[1,2]},"actor":"agent:x","source":"agent","metadata":{"m":true},"refs":{"to_seq":3,"step":0,"request_id":"r","sequence_id":"s"},"idempotency_key":"k1","expected_seq":7}"#,
    r#"{ "actor" : "x", "payload" : { "q" : "\"quoted\" \u2713", "n" : -1.5e3 }, "type" : "t\n", "metadata" : null, "source" : null }"#,
    r#"{"type":"t","payload":{"x":[[[{"y":null}]]]},"actor":"a","expected_seq":18446744073709551615}"#,
];

const CREATES: &[&str] = &[
    "",
    r#"{}"#,
    r#"{"id":"ses_1","title":"","metadata":{"t":"acme"}}"#,
    r#"{"id":"a-b.c:d@e_F9","title":"t \u00e9","metadata":{}}"#,
    r#"{"title":null,"id":null}"#,
];

fn append_command(body: &str) -> AppendCommand {
    AppendCommand::new(
        "ses_1",
        &AppendRequest::parse(body.as_bytes()).unwrap(),
        Timestamp(5),
    )
}

fn main() {
    for (i, body) in APPENDS.iter().enumerate() {
        write("append_request", &format!("seed-{i}"), body.as_bytes());
    }
    for (i, body) in CREATES.iter().enumerate() {
        write("create_request", &format!("seed-{i}"), body.as_bytes());
    }
    for (i, id) in ["ses_demo", "a-b.c:d@e_F9", "\"ses_1\"", "a b"]
        .iter()
        .enumerate()
    {
        write("ids_and_cursors", &format!("seed-{i}"), id.as_bytes());
    }
    write(
        "ids_and_cursors",
        "seed-postcard",
        &postcard::to_allocvec(&SessionId::parse("ses_x").unwrap()).unwrap(),
    );

    // Log segments: the three placements of the input (the first byte, the low byte of the
    // first frame's length, modulo 3), and a torn tail.
    let mut frames = Vec::new();
    for body in [&b"\x00"[..], b"hello", b"", b"world"] {
        encode_frame(body, &mut frames);
    }
    for mode in 0..3u8 {
        let mut seg = Vec::new();
        encode_frame(&vec![b'm'; 3 + usize::from(mode)], &mut seg);
        seg.extend_from_slice(&frames);
        write("wal_frame", &format!("seed-{mode}"), &seg);
    }
    write("wal_frame", "seed-torn", &frames[..frames.len() - 3]);

    // Node log: records written by the real NodeLog, re-packed as the target's input.
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _, _) = NodeLog::open(dir.path(), 2, 1 << 20).unwrap();
        let sync = |f: &dyn Fn(Done)| {
            let (tx, rx) = std::sync::mpsc::channel();
            f(Box::new(move |r| drop(tx.send(r))));
            rx.recv().unwrap().unwrap();
        };
        let hs = Some(HardState {
            term: 3,
            vote: Some(1),
            rejoining: false,
        });
        let entries = vec![
            Entry {
                term: 1,
                index: 1,
                payload: None,
            },
            Entry {
                term: 1,
                index: 2,
                payload: Some(Command::Append(append_command(APPENDS[0]))),
            },
            Entry {
                term: 3,
                index: 3,
                payload: None,
            },
        ];
        sync(&|done| log.write_raft(0, &hs, &entries, done));
        sync(&|done| log.write_raft(1, &None, &entries[..1], done));
        log.write_commits(&[(0, 2), (1, 1)]);
        sync(&|done| log.write_raft(0, &None, &entries[2..], done));
        sync(&|done| log.write_snapshot_point(1, 1, 1, done));
        log.wal().roll(|r| {
            r.unwrap();
        });
        sync(&|done| log.write_raft(0, &None, &[], done));
    }
    let mut records = Vec::new();
    let mut segments: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    for path in segments {
        let bytes = std::fs::read(path).unwrap();
        decode_frames(&bytes, |body| records.push(body.to_vec())).unwrap();
    }
    assert!(records.len() >= 6, "{}", records.len());
    let mut input = vec![1u8]; // 2 groups
    for r in &records {
        input.extend_from_slice(&(r.len() as u16).to_le_bytes());
        input.extend_from_slice(r);
    }
    write("node_log_record", "seed-all", &input);
    for (i, r) in records.iter().enumerate() {
        let mut one = vec![1u8];
        one.extend_from_slice(&(r.len() as u16).to_le_bytes());
        one.extend_from_slice(r);
        write("node_log_record", &format!("seed-{i}"), &one);
    }

    // Peer frames.
    let append = AppendRequest::parse(APPENDS[1].as_bytes()).unwrap();
    let create = CreateRequest::parse(CREATES[2].as_bytes()).unwrap();
    let mut state = GroupState::new(100);
    let created = CreateCommand::new(SessionId::parse("ses_1").unwrap(), &create, Timestamp(1));
    state.apply(&Command::Create(created.clone()));
    state.apply(&Command::Append(append_command(APPENDS[1])));
    let frames = [
        Frame::Hello {
            cluster: 7,
            from: 1,
        },
        Frame::Request {
            id: 1,
            request: Request::Client {
                group: 3,
                op: Box::new(ClientOp::Append {
                    session_id: "ses_1".into(),
                    request: append,
                }),
            },
        },
        Frame::Request {
            id: 2,
            request: Request::Client {
                group: 0,
                op: Box::new(ClientOp::Create {
                    id: SessionId::parse("ses_1").unwrap(),
                    title: create.title.clone(),
                    metadata: create.metadata.clone(),
                }),
            },
        },
        Frame::Request {
            id: 3,
            request: Request::HasData,
        },
        Frame::Response {
            id: 2,
            result: Ok(Response::Client(ClientReply::Created(created))),
        },
        Frame::Response {
            id: 4,
            result: Err("nope".into()),
        },
        Frame::Raft {
            group: 2,
            message: Message::Append {
                term: 3,
                prev_index: 40,
                prev_term: 3,
                entries: vec![Entry {
                    term: 3,
                    index: 41,
                    payload: Some(Command::Append(append_command(APPENDS[2]))),
                }],
                commit: 39,
                last_index: 41,
                sent_at: 77,
            },
        },
        Frame::Raft {
            group: 1,
            message: Message::Snapshot {
                term: 2,
                index: 9,
                snapshot_term: 2,
                data: encode_state(&state),
                sent_at: 5,
            },
        },
        Frame::Raft {
            group: 0,
            message: Message::Vote {
                term: 4,
                last_index: 3,
                last_term: 2,
                pre: true,
                transfer: false,
            },
        },
    ];
    for (i, f) in frames.iter().enumerate() {
        write("rpc_frame", &format!("seed-{i}"), &f.encode().unwrap());
    }
    println!("seeds written");
}
