//! Software fallbacks for offloads the guest did not negotiate.
