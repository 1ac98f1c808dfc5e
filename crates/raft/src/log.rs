//! The in-memory log of one group: entries after the last snapshot point, contiguous.

use crate::Entry;
use starcite_deque::ChunkedDeque;

#[derive(Debug, Clone)]
pub struct Log<P> {
    /// Entries up to here are only in the snapshot.
    snap_index: u64,
    snap_term: u64,
    /// `entries[i].index == snap_index + 1 + i`.
    entries: ChunkedDeque<Entry<P>>,
}

impl<P: Clone> Log<P> {
    pub fn new(snap_index: u64, snap_term: u64, entries: Vec<Entry<P>>) -> Self {
        let mut log = Log {
            snap_index,
            snap_term,
            entries: ChunkedDeque::new(),
        };
        for e in entries {
            if e.index == log.last_index() + 1 {
                log.entries.push_back(e);
            }
        }
        log
    }

    pub fn snap_index(&self) -> u64 {
        self.snap_index
    }

    pub fn snap_term(&self) -> u64 {
        self.snap_term
    }

    pub fn first_index(&self) -> u64 {
        self.snap_index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.snap_index + self.entries.len() as u64
    }

    pub fn last_term(&self) -> u64 {
        self.entries.back().map_or(self.snap_term, |e| e.term)
    }

    /// The term of the entry at `index`, if this log still knows it.
    pub fn term_at(&self, index: u64) -> Option<u64> {
        if index == self.snap_index {
            return Some(self.snap_term);
        }
        self.entry(index).map(|e| e.term)
    }

    pub fn entry(&self, index: u64) -> Option<&Entry<P>> {
        if index <= self.snap_index {
            return None;
        }
        self.entries.get((index - self.snap_index - 1) as usize)
    }

    /// Entries from `from` on: at most `max_count`, and at most `max_bytes` of payload as
    /// `size` counts it (but at least one entry if there is one).
    pub fn slice(
        &self,
        from: u64,
        max_count: usize,
        max_bytes: usize,
        size: fn(&P) -> usize,
    ) -> Vec<Entry<P>> {
        if from <= self.snap_index || from > self.last_index() {
            return Vec::new();
        }
        let mut bytes = 0usize;
        self.entries
            .iter_from((from - self.snap_index - 1) as usize)
            .take(max_count.max(1))
            .enumerate()
            .take_while(|(i, e)| {
                bytes += e.payload.as_ref().map_or(16, size);
                *i == 0 || bytes <= max_bytes
            })
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Entries `from ..= to` (clipped to what the log holds).
    pub fn range(&self, from: u64, to: u64) -> Vec<Entry<P>> {
        let from = from.max(self.snap_index + 1);
        let to = to.min(self.last_index());
        if from > to {
            return Vec::new();
        }
        self.entries
            .iter_from((from - self.snap_index - 1) as usize)
            .take((to - from + 1) as usize)
            .cloned()
            .collect()
    }

    pub fn append(&mut self, entry: Entry<P>) {
        debug_assert_eq!(entry.index, self.last_index() + 1);
        self.entries.push_back(entry);
    }

    /// Removes entries `from` and after.
    pub fn truncate_from(&mut self, from: u64) {
        let keep = from.saturating_sub(self.snap_index + 1) as usize;
        self.entries.truncate(keep);
    }

    /// Forgets entries up to `index`, which a snapshot now covers.
    pub fn compact(&mut self, index: u64) {
        if index <= self.snap_index || index > self.last_index() {
            return;
        }
        let term = self.term_at(index).unwrap_or(self.snap_term);
        let drop = (index - self.snap_index) as usize;
        self.entries.drain_front(drop);
        self.snap_index = index;
        self.snap_term = term;
    }

    /// Adopts a snapshot at (`index`, `term`): entries after it are kept only if this log has
    /// the snapshot's last entry with the same term (then they extend the same history).
    pub fn restore(&mut self, index: u64, term: u64) {
        if self.term_at(index) == Some(term) && index >= self.snap_index {
            self.compact(index);
            return;
        }
        self.entries.clear();
        self.snap_index = index;
        self.snap_term = term;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(_: &u32) -> usize {
        100
    }

    fn e(term: u64, index: u64) -> Entry<u32> {
        Entry {
            term,
            index,
            payload: Some(index as u32),
        }
    }

    #[test]
    fn indices_terms_and_slices() {
        let mut log = Log::new(0, 0, vec![e(1, 1), e(1, 2), e(2, 3)]);
        assert_eq!((log.last_index(), log.last_term()), (3, 2));
        assert_eq!(log.term_at(0), Some(0));
        assert_eq!(log.term_at(3), Some(2));
        assert_eq!(log.term_at(4), None);
        assert_eq!(log.slice(2, 10, usize::MAX, size).len(), 2);
        assert_eq!(
            log.slice(1, 10, 150, size).len(),
            1,
            "byte limit, at least one"
        );
        assert_eq!(log.range(2, 9).len(), 2);
        log.truncate_from(3);
        assert_eq!(log.last_index(), 2);
        log.append(e(3, 3));
        log.compact(2);
        assert_eq!((log.snap_index(), log.snap_term()), (2, 1));
        assert_eq!(log.term_at(2), Some(1));
        assert_eq!(log.term_at(1), None);
        assert!(log.slice(2, 10, usize::MAX, size).is_empty());
        assert_eq!(log.slice(3, 10, usize::MAX, size)[0].term, 3);
    }

    #[test]
    fn restore_keeps_a_matching_suffix_only() {
        let mut log = Log::new(0, 0, vec![e(1, 1), e(1, 2), e(2, 3)]);
        log.restore(2, 1);
        assert_eq!((log.snap_index(), log.last_index()), (2, 3));
        log.restore(5, 4);
        assert_eq!(
            (log.snap_index(), log.last_index(), log.last_term()),
            (5, 5, 4)
        );
        assert!(log.is_empty());
    }
}
