//! Peer frames (`starcite_cluster::rpc::Frame::decode`) from arbitrary bytes: never panic, and
//! whatever decodes encodes again to bytes that decode to the same frame. A Raft snapshot
//! carried by a frame is decoded as a group state too, as a follower installing it would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starcite_cluster::rpc::{command_size, Frame};
use starcite_cluster::state_machine::decode_state;
use starcite_raft::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = Frame::decode(data) else {
        return;
    };
    let bytes = frame.encode().expect("a decoded frame encodes");
    assert!(bytes.len() <= data.len(), "re-encoding grew the frame");
    let again = Frame::decode(&bytes).expect("an encoded frame decodes");
    assert_eq!(again.encode().unwrap(), bytes, "frame does not round-trip");

    if let Frame::Raft { message, .. } = &frame {
        match message {
            Message::Append { entries, .. } => {
                for e in entries {
                    if let Some(command) = &e.payload {
                        let _ = command_size(command);
                        let _ = command.to_string();
                    }
                }
            }
            Message::Snapshot { data, .. } => {
                if let Ok(state) = decode_state(data, 100) {
                    for s in state.sessions() {
                        let _ = s.view();
                    }
                }
            }
            _ => {}
        }
    }
});
