//! A small seeded PRNG (splitmix64): every input is derived from (seed, campaign, round,
//! index) alone, so one failing input can be replayed without running the ones before it.

pub struct Rng(u64);

/// splitmix64's output function: a good 64-bit mix of any counter.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    /// The generator of one input.
    pub fn for_case(seed: u64, campaign: usize, round: u64, index: u64) -> Rng {
        Rng(mix(mix(mix(seed) ^ campaign as u64) ^ round) ^ mix(index))
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability 1/`n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// A value a parser is likely to mishandle, or a random one.
    pub fn interesting(&mut self) -> u64 {
        const V: &[u64] = &[
            0,
            1,
            2,
            3,
            4,
            7,
            8,
            15,
            16,
            255,
            256,
            257,
            0xfff,
            0x1000,
            0x1001,
            0xffff,
            0x1_0000,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            0x1_0000_0000,
            1 << 40,
            u64::MAX / 2,
            u64::MAX - 0xfff,
            u64::MAX - 1,
            u64::MAX,
        ];
        if self.one_in(4) {
            self.next()
        } else {
            self.pick(V)
        }
    }
}
