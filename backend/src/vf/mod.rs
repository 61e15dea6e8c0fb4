//! The VF side of the relay: a Linux netdev reached through packet sockets.
