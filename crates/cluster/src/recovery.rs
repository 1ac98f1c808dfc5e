//! Turning a data directory back into group states: the newest snapshot, then every log
//! record after it, applied in log order.

use crate::NodeError;
use starcite_core::{Command, GroupState};
use starcite_storage::{load_latest_snapshot, Wal, WalOptions};
use std::path::Path;

/// A log record: which group a command belongs to, and the command.
pub(crate) fn encode_record(group: u32, command: &Command) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail.
    postcard::to_allocvec(&(group, command)).unwrap_or_default()
}

fn decode_record(body: &[u8]) -> Result<(u32, Command), postcard::Error> {
    postcard::from_bytes(body)
}

pub(crate) fn encode_state(state: &GroupState) -> Vec<u8> {
    postcard::to_allocvec(state).unwrap_or_default()
}

pub(crate) struct Recovered {
    pub states: Vec<GroupState>,
    pub wal: Wal,
    pub records_replayed: u64,
}

pub(crate) fn recover(
    log_dir: &Path,
    groups: u32,
    idempotency_window: u64,
    segment_bytes: u64,
) -> Result<Recovered, NodeError> {
    let snapshot = load_latest_snapshot(log_dir)?;
    let (mut states, from_segment) = match snapshot {
        Some(snap) => {
            if snap.groups.len() != groups as usize {
                return Err(NodeError::Startup(format!(
                    "snapshot holds {} groups but the node is configured for {groups}",
                    snap.groups.len()
                )));
            }
            let mut states = Vec::with_capacity(snap.groups.len());
            for blob in &snap.groups {
                let state: GroupState = postcard::from_bytes(blob).map_err(|e| {
                    NodeError::Startup(format!("snapshot could not be decoded: {e}"))
                })?;
                states.push(state.with_idempotency_window(idempotency_window));
            }
            (states, snap.segment)
        }
        None => (
            (0..groups)
                .map(|_| GroupState::new(idempotency_window))
                .collect(),
            0,
        ),
    };
    let mut bad_record: Option<String> = None;
    let mut replayed = 0u64;
    let wal = Wal::open(
        WalOptions {
            dir: log_dir.to_path_buf(),
            segment_bytes,
        },
        from_segment,
        |body| {
            if bad_record.is_some() {
                return;
            }
            match decode_record(body) {
                Ok((group, command)) if group < groups => {
                    states[group as usize].apply(&command);
                    replayed += 1;
                }
                Ok((group, _)) => {
                    bad_record = Some(format!(
                        "log record for group {group} but only {groups} groups"
                    ))
                }
                Err(e) => bad_record = Some(format!("undecodable log record: {e}")),
            }
        },
    )?;
    if let Some(reason) = bad_record {
        return Err(NodeError::Startup(reason));
    }
    Ok(Recovered {
        states,
        wal,
        records_replayed: replayed,
    })
}
