//! The hub's memory allocator: jemalloc for small allocations, the system's (glibc's) for large
//! ones.
//!
//! Most of what the hub allocates is small and short-lived, and freed on another thread than
//! the one that allocated it (sled's nodes and log buffers, HTTP/2 frames, protobuf messages):
//! glibc spends a fifth of the hub's CPU on those and on the lock of the arena each free goes
//! back to, where jemalloc's thread caches do better. Large blocks (document bodies and
//! attachments of hundreds of kilobytes, the buffers that carry them) are another matter:
//! jemalloc hands them out in freshly mapped pages that fault on first write, where glibc
//! reuses the freed chunks of its heap. So each allocation goes by its size: below
//! [`LARGE_ALLOCATION_BYTES`] to jemalloc, from it on to the system allocator. A block's size is
//! known again when it is freed or resized (`Layout`), so each one goes back to the allocator it
//! came from. docs/performance.md (change 14) has the measurements.

use std::alloc::{GlobalAlloc, Layout, System};
use tikv_jemallocator::Jemalloc;

/// From this size on, blocks come from the system allocator.
pub(crate) const LARGE_ALLOCATION_BYTES: usize = 64 * 1024;

/// jemalloc below [`LARGE_ALLOCATION_BYTES`], the system allocator from it on.
#[derive(Debug)]
pub(crate) struct SizeSplitAllocator;

fn is_small(size: usize) -> bool {
    size < LARGE_ALLOCATION_BYTES
}

// SAFETY: every block is allocated, resized and freed by the allocator its size selects, and a
// block that changes sides in `realloc` is moved: allocated on the new side, copied, freed on
// the old. Both allocators honour the layout's alignment.
unsafe impl GlobalAlloc for SizeSplitAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `layout` is passed on unchanged.
        unsafe {
            if is_small(layout.size()) {
                Jemalloc.alloc(layout)
            } else {
                System.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if is_small(layout.size()) {
                Jemalloc.alloc_zeroed(layout)
            } else {
                System.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated with `layout`, so by the allocator its size selects.
        unsafe {
            if is_small(layout.size()) {
                Jemalloc.dealloc(ptr, layout)
            } else {
                System.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` was allocated with `layout` by the allocator its size selects; a block
        // that stays on its side is resized there, one that changes sides is moved, and the
        // caller's contract (`new_size` > 0, valid with the alignment) holds for the new layout.
        unsafe {
            match (is_small(layout.size()), is_small(new_size)) {
                (true, true) => Jemalloc.realloc(ptr, layout, new_size),
                (false, false) => System.realloc(ptr, layout, new_size),
                _ => {
                    let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                    let moved = self.alloc(new_layout);
                    if !moved.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    moved
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills `len` bytes at `ptr` with a pattern that differs at every position of a block.
    unsafe fn fill(ptr: *mut u8, len: usize) {
        for i in 0..len {
            // SAFETY: the caller owns `len` bytes at `ptr`.
            unsafe { ptr.add(i).write((i % 251) as u8) };
        }
    }

    unsafe fn holds_pattern(ptr: *const u8, len: usize) -> bool {
        // SAFETY: the caller owns `len` bytes at `ptr`.
        (0..len).all(|i| unsafe { ptr.add(i).read() } == (i % 251) as u8)
    }

    /// Resizes a block whose first `layout.size()` bytes hold the pattern, and checks that the
    /// moved or resized block is aligned and still holds it up to the smaller size.
    unsafe fn resize_keeping_pattern(ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller owns the block, allocated with `layout`.
        unsafe {
            let resized = SizeSplitAllocator.realloc(ptr, layout, new_size);
            assert!(!resized.is_null(), "{} → {new_size} bytes", layout.size());
            assert_eq!(
                resized as usize % layout.align(),
                0,
                "{} → {new_size} bytes: aligned to {}",
                layout.size(),
                layout.align()
            );
            assert!(
                holds_pattern(resized, layout.size().min(new_size)),
                "{} → {new_size} bytes: contents kept",
                layout.size()
            );
            resized
        }
    }

    #[test]
    fn a_block_keeps_its_contents_and_alignment_when_it_changes_sides() {
        let small = 1000;
        let large = LARGE_ALLOCATION_BYTES * 4;
        for align in [8, 64, 4096] {
            let small_layout = Layout::from_size_align(small, align).expect("layout");
            let large_layout = Layout::from_size_align(large, align).expect("layout");
            // SAFETY: each block is used within its size, resized and freed with its layout.
            unsafe {
                let block = SizeSplitAllocator.alloc(small_layout);
                assert!(!block.is_null());
                fill(block, small);
                let grown = resize_keeping_pattern(block, small_layout, large);
                fill(grown, large);
                let shrunk = resize_keeping_pattern(grown, large_layout, small);
                SizeSplitAllocator.dealloc(shrunk, small_layout);
            }
        }
    }

    #[test]
    fn blocks_on_either_side_of_the_threshold_are_zeroed_and_resized_on_their_side() {
        for size in [
            1,
            LARGE_ALLOCATION_BYTES - 1,
            LARGE_ALLOCATION_BYTES,
            LARGE_ALLOCATION_BYTES * 8,
        ] {
            let layout = Layout::from_size_align(size, 16).expect("layout");
            // Stays on its side: one byte less, or twice as large for the large ones.
            let new_size = if is_small(size) {
                size.max(2) - 1
            } else {
                size * 2
            };
            // SAFETY: each block is used within its size, resized and freed with its layout.
            unsafe {
                let block = SizeSplitAllocator.alloc_zeroed(layout);
                assert!(!block.is_null());
                assert!(
                    (0..size).all(|i| block.add(i).read() == 0),
                    "{size} bytes zeroed"
                );
                fill(block, size);
                let resized = resize_keeping_pattern(block, layout, new_size);
                SizeSplitAllocator.dealloc(
                    resized,
                    Layout::from_size_align(new_size, 16).expect("layout"),
                );
            }
        }
    }
}
