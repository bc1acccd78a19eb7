//! The `turnpike` binary: choose the allocator, parse the command line and hand over.
#![cfg_attr(not(test), deny(clippy::as_conversions))]

/// mimalloc, built without transparent huge pages, purging freed pages at once
/// (docs/DESIGN.md#allocator).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (libmimalloc-sys exports no constant
/// for it); the test below checks the index against the option's documented default.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed pages go back to the OS when they empty, not a second later: mimalloc purges lazily,
/// on a thread's next allocation, so an idle worker would keep a burst's pages for good.
fn configure_allocator() {
    // SAFETY: sets a plain integer option; no allocation is in flight on another thread yet.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
}

fn main() -> std::process::ExitCode {
    configure_allocator();
    turnpike::cli::main()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_index_names_the_purge_delay() {
        // SAFETY: reads and writes plain integer options.
        unsafe {
            // Its neighbours' defaults are 1 (deprecated eager commit delay) and 0 (numa nodes).
            assert_eq!(libmimalloc_sys::mi_option_get(PURGE_DELAY), 1000);
            assert_eq!(libmimalloc_sys::mi_option_get(PURGE_DELAY - 1), 1);
            assert_eq!(libmimalloc_sys::mi_option_get(PURGE_DELAY + 1), 0);
        }
        configure_allocator();
        // SAFETY: as above.
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }, 0);
    }
}
