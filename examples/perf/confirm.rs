//! Publisher-confirm accounting: outstanding delivery tags, a semaphore bounding
//! unconfirmed publishes, and the amqprs callback that feeds them.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::stats::Stats;

pub struct ConfirmTracker {
    pub sem: Semaphore,
    pub outstanding: Mutex<BTreeSet<u64>>,
    pub stats: Arc<Stats>,
}

impl ConfirmTracker {
    pub fn settle(&self, tag: u64, multiple: bool, nack: bool) {
        let n = {
            let mut set = self.outstanding.lock().unwrap();
            if multiple {
                let rest = set.split_off(&(tag + 1));
                let n = set.len();
                *set = rest;
                n
            } else {
                set.remove(&tag) as usize
            }
        };
        self.sem.add_permits(n);
        if nack {
            self.stats.nacked.fetch_add(n as u64, Relaxed);
        } else {
            self.stats.confirmed.fetch_add(n as u64, Relaxed);
        }
    }
}

pub struct ConfirmCb(pub Arc<ConfirmTracker>);

pub type BoxFut<'t, T> = Pin<Box<dyn Future<Output = T> + Send + 't>>;
pub type AmqprsResult<T> = Result<T, amqprs::error::Error>;

// Hand-expanded #[async_trait] impl (avoids an extra async-trait dependency).
impl amqprs::callbacks::ChannelCallback for ConfirmCb {
    fn close<'l0, 'l1, 't>(
        &'l0 mut self,
        _channel: &'l1 amqprs::channel::Channel,
        close: amqprs::CloseChannel,
    ) -> BoxFut<'t, AmqprsResult<()>>
    where
        'l0: 't,
        'l1: 't,
        Self: 't,
    {
        Box::pin(async move {
            eprintln!("WARN producer channel closed by broker: {close}");
            Ok(())
        })
    }
    fn cancel<'l0, 'l1, 't>(
        &'l0 mut self,
        _channel: &'l1 amqprs::channel::Channel,
        _cancel: amqprs::Cancel,
    ) -> BoxFut<'t, AmqprsResult<()>>
    where
        'l0: 't,
        'l1: 't,
        Self: 't,
    {
        Box::pin(async { Ok(()) })
    }
    fn flow<'l0, 'l1, 't>(
        &'l0 mut self,
        _channel: &'l1 amqprs::channel::Channel,
        _active: bool,
    ) -> BoxFut<'t, AmqprsResult<bool>>
    where
        'l0: 't,
        'l1: 't,
        Self: 't,
    {
        Box::pin(async { Ok(true) })
    }
    fn publish_ack<'l0, 'l1, 't>(
        &'l0 mut self,
        _channel: &'l1 amqprs::channel::Channel,
        ack: amqprs::Ack,
    ) -> BoxFut<'t, ()>
    where
        'l0: 't,
        'l1: 't,
        Self: 't,
    {
        self.0.settle(ack.delivery_tag(), ack.mutiple(), false);
        Box::pin(async {})
    }
    fn publish_nack<'l0, 'l1, 't>(
        &'l0 mut self,
        _channel: &'l1 amqprs::channel::Channel,
        nack: amqprs::Nack,
    ) -> BoxFut<'t, ()>
    where
        'l0: 't,
        'l1: 't,
        Self: 't,
    {
        self.0.settle(nack.delivery_tag(), nack.multiple(), true);
        Box::pin(async {})
    }
    fn publish_return<'l0, 'l1, 't>(
        &'l0 mut self,
        _channel: &'l1 amqprs::channel::Channel,
        _ret: amqprs::Return,
        _basic_properties: amqprs::BasicProperties,
        _content: Vec<u8>,
    ) -> BoxFut<'t, ()>
    where
        'l0: 't,
        'l1: 't,
        Self: 't,
    {
        Box::pin(async {})
    }
}

// ---------------------------------------------------------------------------------------
// producers
