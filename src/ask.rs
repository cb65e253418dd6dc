//! Asking a background task to do something now and waiting for its answer:
//! an mpsc channel of requests, each with a oneshot sender for the answer.
//! The flusher ("flush now", "refresh now") and the reload task use it.

use tokio::sync::{mpsc, oneshot};

/// One request as the serving task receives it: what to do, and where to
/// send the answer.
pub type Request<Q, A> = (Q, oneshot::Sender<A>);

/// The asking end; cheap to clone.
#[derive(Debug)]
pub struct Asker<Q, A> {
    tx: mpsc::Sender<Request<Q, A>>,
}

impl<Q, A> Clone for Asker<Q, A> {
    fn clone(&self) -> Self {
        Asker {
            tx: self.tx.clone(),
        }
    }
}

/// An [`Asker`] and the receiver the serving task reads requests from.
pub fn channel<Q, A>(capacity: usize) -> (Asker<Q, A>, mpsc::Receiver<Request<Q, A>>) {
    let (tx, rx) = mpsc::channel(capacity);
    (Asker { tx }, rx)
}

impl<Q, A> Asker<Q, A> {
    /// Asks and waits for the answer; `None` if the task has stopped.
    pub async fn ask(&self, request: Q) -> Option<A> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((request, tx)).await.ok()?;
        rx.await.ok()
    }
}
