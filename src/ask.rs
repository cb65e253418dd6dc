//! Asking a background task to do something now and waiting for its answer:
//! an mpsc channel of oneshot reply senders. The flusher ("flush now") and
//! the reload task use it.

use tokio::sync::{mpsc, oneshot};

/// Where a task sends the answer to one request.
pub type Reply<T> = oneshot::Sender<T>;

/// The asking end; cheap to clone.
#[derive(Debug)]
pub struct Asker<T> {
    tx: mpsc::Sender<Reply<T>>,
}

impl<T> Clone for Asker<T> {
    fn clone(&self) -> Self {
        Asker {
            tx: self.tx.clone(),
        }
    }
}

/// An [`Asker`] and the receiver the serving task reads requests from.
pub fn channel<T>(capacity: usize) -> (Asker<T>, mpsc::Receiver<Reply<T>>) {
    let (tx, rx) = mpsc::channel(capacity);
    (Asker { tx }, rx)
}

impl<T> Asker<T> {
    /// Asks and waits for the answer; `None` if the task has stopped.
    pub async fn ask(&self) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).await.ok()?;
        rx.await.ok()
    }
}
