//! Live migration between two simulated hosts (see `qemu_tests::migration` and
//! docs/migration.md): the scenarios of the `migrate` command, asserted. Scenarios with the
//! same guest shape share one boot to keep CI time down.

use qemu_tests::e2e_test;
use qemu_tests::migration::scenarios::{prepare_image, run_and_check, Scenario};
use qemu_tests::migration::BackendKind;

#[test]
fn vhost_relay_migrates_under_ping_and_stream_there_and_back_and_after_a_cancel() {
    e2e_test("migration_vhost_relay", &["rustc"], |_env| {
        run_and_check(
            &prepare_image()?,
            BackendKind::VhostRelay,
            &[
                Scenario::Ping,
                Scenario::Stream,
                Scenario::RoundTrips,
                Scenario::Cancel,
            ],
        )
    });
}

#[test]
fn vhost_relay_migrates_two_loaded_queue_pairs() {
    e2e_test("migration_vhost_relay_multiqueue", &["rustc"], |_env| {
        run_and_check(
            &prepare_image()?,
            BackendKind::VhostRelay,
            &[Scenario::Multiqueue],
        )
    });
}

/// The negative control: with RX data hidden from the dirty log (test-only build), the stream
/// scenario must find corrupted chunks. If this fails, the stream scenario proves nothing.
#[test]
fn unlogged_rx_writes_are_caught_as_corruption() {
    e2e_test("migration_negative_control", &["rustc", "cargo"], |_env| {
        run_and_check(
            &prepare_image()?,
            BackendKind::VhostRelay,
            &[Scenario::NegativeControl],
        )
    });
}

/// A guest with packed rings (`packed=on`) migrated under the verified stream, and the
/// negative control on the same guest shape: without it the packed stream proves nothing.
#[test]
fn vhost_relay_migrates_a_packed_ring_guest() {
    e2e_test(
        "migration_vhost_relay_packed",
        &["rustc", "cargo"],
        |_env| {
            run_and_check(
                &prepare_image()?,
                BackendKind::VhostRelay,
                &[Scenario::PackedStream, Scenario::PackedNegative],
            )
        },
    );
}

/// The same scenarios with DPDK testpmd's net_vhost on both hosts (the anchor, reported side
/// by side by the `migrate` command): if the reference fails, the harness is broken, not
/// vhost-relay.
#[test]
fn testpmd_reference_migrates_in_the_same_scenarios() {
    e2e_test(
        "migration_testpmd_reference",
        &["rustc", "dpdk-testpmd", "ethtool"],
        |_env| {
            run_and_check(
                &prepare_image()?,
                BackendKind::Testpmd,
                &[
                    Scenario::Ping,
                    Scenario::Stream,
                    Scenario::RoundTrips,
                    Scenario::Cancel,
                    Scenario::Multiqueue,
                ],
            )
        },
    );
}
