//! How the embedded archive packs events: a session's consecutive events go into one row, a
//! chunk, instead of one row (and one index entry) each. A flush of a few thousand events then
//! costs SQLite a few dozen inserts, not a few thousand row and index inserts; the per-event
//! cost was most of the embedded archive's CPU and the reason a flush slowed appends.
//!
//! A chunk's `frames` column is a JSON array of the frames exactly as inserted
//! (`[f1,f2,…]`), so SQL (`json_each`) can still see every event; `starts` is a JSON array
//! of the byte offset where each frame starts, plus the text's length, so a reader cuts the
//! frames out without parsing them: every frame ends one byte (a comma or the closing
//! bracket) before the next offset.

use bytes::Bytes;
use std::ops::Range;

/// Events per chunk at most. Besides bounding what a read decodes without needing it, this
/// lets a lookup of seq `s` search only chunks that start after `s - MAX_EVENTS`.
pub(crate) const MAX_EVENTS: u64 = 256;
/// Frame bytes per chunk at most (an event larger than this gets a chunk of its own).
pub(crate) const MAX_BYTES: usize = 1024 * 1024;

/// Consecutive events of one session.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Run<'a> {
    pub session_id: &'a str,
    pub first_seq: u64,
    pub frames: Vec<&'a str>,
}

impl Run<'_> {
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.frames.len() as u64 - 1
    }
}

/// Groups `(session, seq, frame)` into runs of consecutive seqs, by session and seq; a seq
/// sent twice in one batch is kept once (the first copy).
pub(crate) fn runs<'a>(mut events: Vec<(&'a str, u64, &'a str)>) -> Vec<Run<'a>> {
    // Stable, so the first copy of a duplicate comes first.
    events.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut out: Vec<Run<'a>> = Vec::new();
    for (session_id, seq, frame) in events {
        match out.last_mut() {
            Some(run) if run.session_id == session_id && seq <= run.last_seq() => {}
            Some(run) if run.session_id == session_id && seq == run.last_seq() + 1 => {
                run.frames.push(frame)
            }
            _ => out.push(Run {
                session_id,
                first_seq: seq,
                frames: vec![frame],
            }),
        }
    }
    out
}

/// The parts of `first..=last` that `stored` (ascending, disjoint inclusive ranges) does not
/// cover.
pub(crate) fn uncovered(first: u64, last: u64, stored: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut next = first;
    for &(a, b) in stored {
        if next > last {
            break;
        }
        if b < next {
            continue;
        }
        if a > next {
            out.push((next, (a - 1).min(last)));
        }
        next = next.max(b.saturating_add(1));
    }
    if next <= last {
        out.push((next, last));
    }
    out
}

/// Cuts `runs` (in order) into the parts one transaction stores: at most `max_bytes` of frames
/// each, a run cut where it crosses the limit; a frame larger than the limit gets a part of
/// its own. Concatenated, the parts are `runs` again.
pub(crate) fn commits(runs: Vec<Run<'_>>, max_bytes: usize) -> Vec<Vec<Run<'_>>> {
    let mut out = Vec::new();
    let mut part: Vec<Run<'_>> = Vec::new();
    let mut bytes = 0;
    for run in runs {
        let mut piece = Run {
            session_id: run.session_id,
            first_seq: run.first_seq,
            frames: Vec::new(),
        };
        for frame in run.frames {
            if bytes > 0 && bytes + frame.len() > max_bytes {
                if !piece.frames.is_empty() {
                    let rest = Run {
                        session_id: piece.session_id,
                        first_seq: piece.last_seq() + 1,
                        frames: Vec::new(),
                    };
                    part.push(std::mem::replace(&mut piece, rest));
                }
                out.push(std::mem::take(&mut part));
                bytes = 0;
            }
            bytes += frame.len();
            piece.frames.push(frame);
        }
        if !piece.frames.is_empty() {
            part.push(piece);
        }
    }
    if !part.is_empty() {
        out.push(part);
    }
    out
}

/// The highest seq of each session in `runs` (sorted by session, then seq).
pub(crate) fn last_seqs<'a>(runs: &[Run<'a>]) -> Vec<(&'a str, u64)> {
    let mut out: Vec<(&'a str, u64)> = Vec::new();
    for run in runs {
        match out.last_mut() {
            Some(last) if last.0 == run.session_id => last.1 = last.1.max(run.last_seq()),
            _ => out.push((run.session_id, run.last_seq())),
        }
    }
    out
}

/// Cuts consecutive frames into chunk-sized pieces (index ranges into `frames`).
pub(crate) fn split(frames: &[&str]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, frame) in frames.iter().enumerate() {
        let full =
            i - start == MAX_EVENTS as usize || (i > start && bytes + frame.len() > MAX_BYTES);
        if full {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += frame.len();
    }
    if start < frames.len() {
        out.push(start..frames.len());
    }
    out
}

/// A chunk's two columns.
pub(crate) struct Encoded {
    pub frames: String,
    pub starts: String,
}

pub(crate) fn encode(frames: &[&str]) -> Encoded {
    let size: usize = frames.iter().map(|f| f.len() + 1).sum();
    let mut text = String::with_capacity(size + 1);
    let mut starts = String::with_capacity(frames.len() * 8 + 2);
    text.push('[');
    starts.push('[');
    for (i, frame) in frames.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        starts.push_str(&text.len().to_string());
        starts.push(',');
        text.push_str(frame);
    }
    text.push(']');
    starts.push_str(&text.len().to_string());
    starts.push(']');
    Encoded {
        frames: text,
        starts,
    }
}

/// The frames of a chunk, each a slice of `text` (no copy). An error says what is wrong with
/// a chunk that does not decode.
pub(crate) fn decode(text: Bytes, starts: &str) -> Result<Vec<Bytes>, String> {
    let starts: Vec<usize> =
        serde_json::from_str(starts).map_err(|e| format!("bad frame offsets: {e}"))?;
    let mut out = Vec::with_capacity(starts.len().saturating_sub(1));
    for pair in starts.windows(2) {
        // Each frame ends one byte before the next starts (the comma or the closing bracket).
        let (start, end) = (pair[0], pair[1].wrapping_sub(1));
        if start > end || end > text.len() {
            return Err(format!(
                "frame offsets {start}..{end} outside a chunk of {} bytes",
                text.len()
            ));
        }
        out.push(text.slice(start..end));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_consecutive_seqs_per_session_and_drop_repeats() {
        let got = runs(vec![
            ("b", 2, "b2"),
            ("a", 1, "a1"),
            ("b", 1, "b1"),
            ("a", 2, "a2"),
            ("a", 4, "a4"),
            ("a", 2, "a2-again"),
        ]);
        assert_eq!(
            got,
            vec![
                Run {
                    session_id: "a",
                    first_seq: 1,
                    frames: vec!["a1", "a2"]
                },
                Run {
                    session_id: "a",
                    first_seq: 4,
                    frames: vec!["a4"]
                },
                Run {
                    session_id: "b",
                    first_seq: 1,
                    frames: vec!["b1", "b2"]
                },
            ]
        );
    }

    #[test]
    fn uncovered_is_what_the_stored_ranges_leave_out() {
        assert_eq!(uncovered(1, 10, &[]), vec![(1, 10)]);
        assert_eq!(uncovered(1, 10, &[(1, 10)]), vec![]);
        assert_eq!(uncovered(5, 10, &[(1, 6)]), vec![(7, 10)]);
        assert_eq!(
            uncovered(1, 10, &[(3, 4), (7, 7)]),
            vec![(1, 2), (5, 6), (8, 10)]
        );
        assert_eq!(uncovered(1, 5, &[(3, 20)]), vec![(1, 2)]);
        assert_eq!(uncovered(4, 5, &[(1, 2), (9, 9)]), vec![(4, 5)]);
    }

    fn run<'a>(session_id: &'a str, first_seq: u64, frames: &[&'a str]) -> Run<'a> {
        Run {
            session_id,
            first_seq,
            frames: frames.to_vec(),
        }
    }

    #[test]
    fn commits_cut_runs_at_the_byte_limit_and_keep_everything_in_order() {
        let input = || {
            vec![
                run("a", 1, &["aaaa", "bbbb", "cccc"]),
                run("a", 7, &["dd"]),
                run("b", 3, &["eeeeee", "ff"]),
            ]
        };
        let parts = commits(input(), 10);
        assert_eq!(
            parts,
            vec![
                vec![run("a", 1, &["aaaa", "bbbb"])],
                vec![run("a", 3, &["cccc"]), run("a", 7, &["dd"])],
                vec![run("b", 3, &["eeeeee", "ff"])],
            ]
        );
        for part in &parts {
            let bytes: usize = part.iter().flat_map(|r| &r.frames).map(|f| f.len()).sum();
            assert!(bytes <= 10, "{part:?}");
        }
        // One part when everything fits; a frame over the limit is alone, never dropped.
        assert_eq!(commits(input(), 1000), vec![input()]);
        let alone = commits(vec![run("a", 1, &["xx", "yyyyyyyyyyyy", "zz"])], 10);
        assert_eq!(
            alone,
            vec![
                vec![run("a", 1, &["xx"])],
                vec![run("a", 2, &["yyyyyyyyyyyy"])],
                vec![run("a", 3, &["zz"])],
            ]
        );
        assert!(commits(Vec::new(), 10).is_empty());
    }

    #[test]
    fn last_seqs_are_each_sessions_highest_seq() {
        let runs = vec![
            run("a", 1, &["1", "2"]),
            run("a", 7, &["7"]),
            run("b", 3, &["3", "4", "5"]),
        ];
        assert_eq!(last_seqs(&runs), vec![("a", 7), ("b", 5)]);
        assert!(last_seqs(&[]).is_empty());
    }

    #[test]
    fn split_respects_the_event_and_byte_limits() {
        let small = vec!["x"; 600];
        let pieces = split(&small);
        assert_eq!(pieces, vec![0..256, 256..512, 512..600]);
        let big = "y".repeat(MAX_BYTES / 2 + 1);
        let frames = vec![big.as_str(), big.as_str(), "z", big.as_str()];
        assert_eq!(split(&frames), vec![0..1, 1..3, 3..4]);
        let huge = "h".repeat(MAX_BYTES * 2);
        assert_eq!(split(&[huge.as_str()]), vec![0..1]);
        assert!(split(&[]).is_empty());
    }

    #[test]
    fn a_chunk_is_a_json_array_and_decodes_to_the_exact_frames() {
        let frames = [
            r#"{"seq":1,"payload":{"a" : [1, 2.50]}}"#,
            r#"{"seq":2,"payload":"é ✓ \"q\" , ] ["}"#,
            r#"{"seq":3}"#,
        ];
        let chunk = encode(&frames);
        let parsed: Vec<serde_json::Value> = serde_json::from_str(&chunk.frames).unwrap();
        assert_eq!(parsed.len(), 3);
        let back = decode(Bytes::from(chunk.frames.clone()), &chunk.starts).unwrap();
        let back: Vec<&[u8]> = back.iter().map(|b| b.as_ref()).collect();
        let want: Vec<&[u8]> = frames.iter().map(|f| f.as_bytes()).collect();
        assert_eq!(back, want);
    }

    #[test]
    fn offsets_outside_the_chunk_are_an_error_not_a_panic() {
        let text = Bytes::from_static(b"[{}]");
        assert!(decode(text.clone(), "[1,99]").is_err());
        assert!(decode(text.clone(), "[3,1]").is_err());
        assert!(decode(text.clone(), "not json").is_err());
        assert_eq!(
            decode(text, "[1,4]").unwrap(),
            vec![Bytes::from_static(b"{}")]
        );
    }
}
