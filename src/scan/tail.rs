//! Tails: the last bytes of a view that a match not yet reported can still reach.
//!
//! A stream does not keep its text. Each view keeps a [`Tail`]: its entries (raw bytes, or
//! normalized bytes with their original spans) from the oldest offset a partial match, a pending
//! anchor or a look-behind can still start at, and no further ([`keep_from`]). What that offset
//! is belongs to each view (`RawState::oldest`, `WordState::oldest`); the tail only keeps what it
//! is told, bounded by the view's window, and gives back room it no longer uses.

/// The entry for stream offset `n` of a view: in the current chunk (`batch`, from offset `base`
/// on) or, for older offsets, in the tail.
#[inline]
pub(crate) fn at<T: Copy>(base: u64, batch: &[T], tail: &Tail<T>, n: u64) -> T {
    if n >= base {
        batch[(n - base) as usize]
    } else {
        tail.v[(n - tail.from()) as usize]
    }
}

/// The first offset a view's tail keeps, `pos` bytes into the view: from `oldest` (see
/// `WordState::oldest` and `RawState::oldest`) with one byte of context
/// before it (a DFA's or a confirmation's look-behind sees the real neighbour), and never more
/// than `window` bytes back.
pub(crate) fn keep_from(oldest: u64, pos: u64, window: usize) -> u64 {
    oldest
        .saturating_sub(1)
        .max(pos.saturating_sub(window as u64))
}

/// The last entries of a view before the current chunk: those from offset `from` on, as far
/// back as a partial match, a pending anchor or a look-behind can still reach (see
/// [`keep_from`]); nothing older.
pub(crate) struct Tail<T> {
    /// Offset of the first entry (32 bits, like the other offsets a stream keeps: a stream is
    /// limited to 4 GiB).
    from: u32,
    pub(crate) v: Vec<T>,
    /// Consecutive updates that used less than half the room.
    idle: u32,
}

/// Updates of a tail that must use less than half its room before the room is given back.
pub(crate) const TAIL_IDLE_UPDATES: u32 = 16;

impl<T> Default for Tail<T> {
    fn default() -> Self {
        Tail {
            from: 0,
            v: Vec::new(),
            idle: 0,
        }
    }
}

impl<T: Copy> Tail<T> {
    /// Drops the entries before `keep_from`, then appends the `n` new entries `new(i)` (offsets
    /// `base + i`, where the tail ends) from `keep_from` on.
    pub(crate) fn keep(&mut self, keep_from: u64, base: u64, n: usize, new: impl Fn(usize) -> T) {
        debug_assert_eq!(self.from() + self.v.len() as u64, base);
        let drop = keep_from.min(base).saturating_sub(self.from()) as usize;
        if drop > 0 {
            self.v.drain(..drop);
            self.from += drop as u32;
        }
        let skip = keep_from.saturating_sub(base).min(n as u64) as usize;
        if skip > 0 {
            self.from += skip as u32;
        }
        self.v.extend((skip..n).map(new));
        // What a long partial match or a pending anchor grew is given back once the tail has
        // used less than half of it for a while (not at once: anchors come in bursts, and
        // reallocating at every one cost 8% of a chat stream's speed).
        if self.v.capacity() > 16 && self.v.len() * 2 < self.v.capacity() {
            self.idle += 1;
            if self.idle >= TAIL_IDLE_UPDATES {
                self.v.shrink_to(self.v.len().max(8).next_power_of_two());
                self.idle = 0;
            }
        } else {
            self.idle = 0;
        }
    }

    /// Offset of the first entry kept.
    pub(crate) fn from(&self) -> u64 {
        self.from as u64
    }

    pub(crate) fn bytes(&self) -> usize {
        self.v.capacity() * std::mem::size_of::<T>()
    }
}

/// A list of pending anchors or walkers, empty and without room, gets room for two (not the
/// four a `Vec` takes at first): most streams hold one or two at a time.
pub(crate) fn small_room<T>(v: &mut Vec<T>) {
    if v.capacity() == 0 {
        v.reserve_exact(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_keeps_from_where_it_is_told_and_gives_room_back() {
        let mut t: Tail<u8> = Tail::default();
        let data: Vec<u8> = (0..=255u8).collect();
        // Offsets 0..100 arrive; keep from 90.
        t.keep(90, 0, 100, |i| data[i]);
        assert_eq!((t.from(), &t.v[..]), (90, &data[90..100]));
        // 100..110 arrive; keep from 95: 95..110.
        t.keep(95, 100, 10, |i| data[100 + i]);
        assert_eq!((t.from(), &t.v[..]), (95, &data[95..110]));
        // Keep from beyond what arrived: only the new entries from there.
        t.keep(115, 110, 10, |i| data[110 + i]);
        assert_eq!((t.from(), &t.v[..]), (115, &data[115..120]));
        // Nothing kept.
        t.keep(130, 120, 10, |i| data[120 + i]);
        assert_eq!((t.from(), t.v.len()), (130, 0));
        // A long partial match grows the tail; once it has been over for a while the room is
        // given back.
        t.keep(130, 130, 120, |i| data[130 + i]);
        let grown = t.v.capacity();
        assert!(grown >= 120);
        t.keep(248, 250, 2, |i| data[250 + i]);
        assert_eq!((t.from(), &t.v[..]), (248, &data[248..252]));
        for k in 1..TAIL_IDLE_UPDATES {
            assert_eq!(t.v.capacity(), grown, "given back after {k} updates");
            let at = 251 + k as u64;
            t.keep(at - 2, at, 1, |_| 0);
        }
        assert!(t.v.capacity() <= 16, "capacity {}", t.v.capacity());
    }
}
