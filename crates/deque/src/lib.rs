//! A double-ended queue stored in blocks of at most [`BLOCK`] slots.
//!
//! `VecDeque` doubles its buffer when full: it allocates twice the memory and copies every
//! element into it, and each fresh page costs a fault (an expensive one on the virtual
//! machines this project is measured on). A node holds one queue per session (its events in
//! memory) and one per Raft group (its log), and under an even load they fill up together,
//! so they all grew within the same few milliseconds: on the three-node benchmark, 500
//! sessions' event queues doubling at once stalled every node for 30–50 ms, the slowest
//! moments of a half-load run (docs/benchmarks.md, seventeenth session). Here a queue grows
//! one small block at a time (a block's buffer grows as a `VecDeque`'s does, so at most one
//! block, 128 elements, is ever copied), and each queue's first block holds a different
//! number of slots ([`stagger`]), so queues that grow in step start new blocks at different
//! moments.

use serde::de::{SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Slots per block: one 4 KiB page for 32-byte elements (`Bytes`).
pub const BLOCK: usize = 128;

/// The number of slots of a new queue's first block, different from one queue to the next
/// (a counter spread over `1..=BLOCK`), so that the block boundaries of queues filled in
/// step fall at different lengths.
fn stagger() -> usize {
    static QUEUES: AtomicUsize = AtomicUsize::new(0);
    first_block_of(QUEUES.fetch_add(1, Ordering::Relaxed))
}

/// The first block's size for the `n`th queue: 79 is coprime with [`BLOCK`], so consecutive
/// queues get sizes far apart, and every size in turn.
fn first_block_of(n: usize) -> usize {
    n.wrapping_mul(79) % BLOCK + 1
}

/// A double-ended queue of blocks. Every block but the first and the last is full (holds
/// [`BLOCK`] elements), so the position of an element is arithmetic. A block's buffer grows
/// as `VecDeque`'s does, up to [`BLOCK`] slots, so a short queue holds little memory.
#[derive(Clone)]
pub struct ChunkedDeque<T> {
    blocks: VecDeque<VecDeque<T>>,
    len: usize,
    /// How many elements `push_back` puts in the first block while it is the only one.
    first_block: usize,
}

impl<T> Default for ChunkedDeque<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> ChunkedDeque<T> {
    pub const fn new() -> Self {
        ChunkedDeque {
            blocks: VecDeque::new(),
            len: 0,
            first_block: BLOCK,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push_back(&mut self, value: T) {
        let limit = if self.blocks.len() == 1 {
            self.first_block
        } else {
            BLOCK
        };
        match self.blocks.back_mut() {
            Some(last) if last.len() < limit => last.push_back(value),
            _ => {
                if self.blocks.is_empty() {
                    self.first_block = stagger();
                }
                self.blocks.push_back(VecDeque::from([value]));
            }
        }
        self.len += 1;
    }

    pub fn push_front(&mut self, value: T) {
        match self.blocks.front_mut() {
            Some(first) if first.len() < BLOCK => first.push_front(value),
            _ => {
                self.blocks.push_front(VecDeque::from([value]));
                self.first_block = BLOCK;
            }
        }
        self.len += 1;
    }

    pub fn pop_front(&mut self) -> Option<T> {
        let first = self.blocks.front_mut()?;
        let value = first.pop_front();
        if first.is_empty() {
            self.blocks.pop_front();
            // The block that is first now was filled as a full one.
            self.first_block = BLOCK;
        }
        if value.is_some() {
            self.len -= 1;
        }
        value
    }

    pub fn front(&self) -> Option<&T> {
        self.blocks.front().and_then(|b| b.front())
    }

    pub fn back(&self) -> Option<&T> {
        self.blocks.back().and_then(|b| b.back())
    }

    /// The block and the slot in it of element `index` (which must be `< len`).
    fn locate(&self, index: usize) -> (usize, usize) {
        let first = self.blocks.front().map_or(0, |b| b.len());
        if index < first {
            (0, index)
        } else {
            let rest = index - first;
            (1 + rest / BLOCK, rest % BLOCK)
        }
    }

    pub fn get(&self, index: usize) -> Option<&T> {
        if index >= self.len {
            return None;
        }
        let (block, slot) = self.locate(index);
        self.blocks.get(block).and_then(|b| b.get(slot))
    }

    /// The elements from `start` on, in order (none if `start >= len`).
    pub fn iter_from(&self, start: usize) -> impl Iterator<Item = &T> + '_ {
        let (block, slot) = if start < self.len {
            self.locate(start)
        } else {
            (self.blocks.len(), 0)
        };
        self.blocks
            .range(block.min(self.blocks.len())..)
            .enumerate()
            .flat_map(move |(i, b)| b.range(if i == 0 { slot } else { 0 }..))
    }

    pub fn iter(&self) -> Iter<'_, T> {
        self.blocks.iter().flatten()
    }

    /// Removes the first `n` elements (all of them if fewer), handing them out in order;
    /// whatever the iterator is not asked for is dropped with it.
    pub fn drain_front(&mut self, n: usize) -> DrainFront<'_, T> {
        let left = n.min(self.len);
        DrainFront { deque: self, left }
    }

    /// Keeps the first `len` elements and drops the rest.
    pub fn truncate(&mut self, len: usize) {
        while self.len > len {
            let excess = self.len - len;
            let Some(last) = self.blocks.back_mut() else {
                break;
            };
            if last.len() <= excess {
                self.len -= last.len();
                self.blocks.pop_back();
            } else {
                last.truncate(last.len() - excess);
                self.len = len;
            }
        }
    }

    pub fn clear(&mut self) {
        self.blocks.clear();
        self.len = 0;
    }
}

/// The elements in order, front to back.
pub type Iter<'a, T> = std::iter::Flatten<std::collections::vec_deque::Iter<'a, VecDeque<T>>>;

impl<'a, T> IntoIterator for &'a ChunkedDeque<T> {
    type Item = &'a T;
    type IntoIter = Iter<'a, T>;

    fn into_iter(self) -> Iter<'a, T> {
        self.iter()
    }
}

/// See [`ChunkedDeque::drain_front`].
pub struct DrainFront<'a, T> {
    deque: &'a mut ChunkedDeque<T>,
    left: usize,
}

impl<T> Iterator for DrainFront<'_, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.deque.pop_front()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<T> Drop for DrainFront<'_, T> {
    fn drop(&mut self) {
        for _ in self.by_ref() {}
    }
}

impl<T> FromIterator<T> for ChunkedDeque<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut deque = ChunkedDeque::new();
        for value in iter {
            deque.push_back(value);
        }
        deque
    }
}

impl<T: fmt::Debug> fmt::Debug for ChunkedDeque<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: PartialEq> PartialEq for ChunkedDeque<T> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

/// A sequence, like `VecDeque`: a snapshot written with either reads back into the other.
impl<T: Serialize> Serialize for ChunkedDeque<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.len))?;
        for value in self.iter() {
            seq.serialize_element(value)?;
        }
        seq.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ChunkedDeque<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SeqVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for SeqVisitor<T> {
            type Value = ChunkedDeque<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut deque = ChunkedDeque::new();
                while let Some(value) = seq.next_element()? {
                    deque.push_back(value);
                }
                Ok(deque)
            }
        }
        deserializer.deserialize_seq(SeqVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        PushBack(u32),
        PushFront(u32),
        PopFront,
        DrainFront(usize),
        Truncate(usize),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            20 => any::<u32>().prop_map(Op::PushBack),
            3 => any::<u32>().prop_map(Op::PushFront),
            4 => Just(Op::PopFront),
            2 => (0usize..400).prop_map(Op::DrainFront),
            1 => (0usize..600).prop_map(Op::Truncate),
            1 => Just(Op::Clear),
        ]
    }

    fn check(model: &VecDeque<u32>, deque: &ChunkedDeque<u32>) -> Result<(), TestCaseError> {
        prop_assert_eq!(model.len(), deque.len());
        prop_assert_eq!(model.front(), deque.front());
        prop_assert_eq!(model.back(), deque.back());
        prop_assert!(model.iter().eq(deque.iter()));
        for start in [
            0,
            1,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            model.len() / 2,
            model.len(),
            model.len() + 3,
        ] {
            prop_assert!(
                model.iter().skip(start).eq(deque.iter_from(start)),
                "from {}",
                start
            );
            prop_assert_eq!(model.get(start), deque.get(start));
        }
        // Every block but the first and the last is full: what `locate` relies on.
        let blocks = deque.blocks.len();
        for (i, b) in deque.blocks.iter().enumerate() {
            prop_assert!(!b.is_empty() && b.len() <= BLOCK);
            if i != 0 && i + 1 != blocks {
                prop_assert_eq!(b.len(), BLOCK);
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn behaves_like_a_vecdeque(ops in proptest::collection::vec(op(), 0..2000)) {
            let mut model = VecDeque::new();
            let mut deque = ChunkedDeque::new();
            for op in ops {
                match op {
                    Op::PushBack(v) => { model.push_back(v); deque.push_back(v); }
                    Op::PushFront(v) => { model.push_front(v); deque.push_front(v); }
                    Op::PopFront => prop_assert_eq!(model.pop_front(), deque.pop_front()),
                    Op::DrainFront(n) => {
                        let expected: Vec<u32> = model.drain(..n.min(model.len())).collect();
                        let drained: Vec<u32> = deque.drain_front(n).collect();
                        prop_assert_eq!(expected, drained);
                    }
                    Op::Truncate(n) => { model.truncate(n); deque.truncate(n); }
                    Op::Clear => { model.clear(); deque.clear(); }
                }
                check(&model, &deque)?;
            }
        }
    }

    #[test]
    fn a_drain_dropped_early_still_removes_everything_it_was_asked_to() {
        let mut deque: ChunkedDeque<u32> = (0..300).collect();
        let first: Vec<u32> = deque.drain_front(200).take(3).collect();
        assert_eq!(first, vec![0, 1, 2]);
        assert_eq!(deque.len(), 100);
        assert_eq!(deque.front(), Some(&200));
    }

    #[test]
    fn growing_never_moves_a_full_block() {
        let mut deque = ChunkedDeque::new();
        while deque.blocks.len() < 2 {
            deque.push_back(0u64);
        }
        let first = deque.front().map(|v| v as *const u64);
        for i in 0..10 * BLOCK as u64 {
            deque.push_back(i);
        }
        assert_eq!(deque.front().map(|v| v as *const u64), first);
        assert!(deque.blocks.iter().all(|b| b.capacity() <= BLOCK));
    }

    #[test]
    fn queues_start_their_second_block_at_different_lengths() {
        let mut sizes: Vec<usize> = (0..BLOCK).map(first_block_of).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, (1..=BLOCK).collect::<Vec<_>>());
        let mut deque = ChunkedDeque::new();
        deque.push_back(0u32);
        deque.first_block = 5;
        while deque.blocks.len() < 2 {
            deque.push_back(0);
        }
        assert_eq!(deque.len(), 6);
    }

    #[test]
    fn serialises_as_the_same_sequence_as_a_vecdeque() {
        let model: VecDeque<u32> = (0..300).collect();
        let deque: ChunkedDeque<u32> = (0..300).collect();
        let json = serde_json::to_string(&deque).unwrap();
        assert_eq!(json, serde_json::to_string(&model).unwrap());
        let back: ChunkedDeque<u32> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, deque);
    }
}
