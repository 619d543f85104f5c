//! Any bytes as a frame of every message kind a node receives: the frame reader and rkyv's
//! validation must refuse what is not a message without panicking; what decodes must encode
//! and decode to the same value, and the receivers' checks (a submitted build request, an
//! offered job) must answer without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_shared::wire::{
    ClientMsg, CoordinatorToClient, CoordinatorToWorker, Hello, HelloReply, PeerMsg, WireMessage,
    WorkerMsg, read_frame_or_eof,
};

/// Reads `bytes` as frames of `T` until the end or the first error; checks each message.
fn frames<T: WireMessage + PartialEq + std::fmt::Debug>(bytes: &[u8], check: impl Fn(&T)) {
    let mut reader = bytes;
    futures::executor::block_on(async {
        while let Ok(Some(msg)) = read_frame_or_eof::<T>(&mut reader).await {
            check(&msg);
        }
    });
    // The bytes as one bare archive, without the frame.
    if let Ok(msg) = T::from_archive(bytes) {
        let again = T::from_archive(&msg.to_archive().expect("a decoded message encodes"))
            .expect("an encoded message decodes");
        assert_eq!(again, msg);
        check(&msg);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 7 {
        0 => frames::<Hello>(bytes, |_| {}),
        1 => frames::<HelloReply>(bytes, |_| {}),
        2 => frames::<PeerMsg>(bytes, |_| {}),
        3 => frames::<WorkerMsg>(bytes, |_| {}),
        4 => frames::<CoordinatorToWorker>(bytes, |m| {
            if let CoordinatorToWorker::Offer(offer) = m {
                let _ = offer.job.validate_remote();
            }
        }),
        5 => frames::<ClientMsg>(bytes, |m| {
            if let ClientMsg::Submit(submit) = m {
                let _ = submit.request.validate(false);
            }
        }),
        _ => frames::<CoordinatorToClient>(bytes, |_| {}),
    }
});
