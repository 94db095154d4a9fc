//! A TCP proxy on loopback that can stop forwarding without closing anything: a blackhole, the
//! way a database looks behind a NAT that dropped its state, or a server frozen mid-answer.
//! Connections stay open and nothing answers; when forwarding resumes, bytes held meanwhile flow
//! on. Bounded: it lives as long as its handle, and every task it starts ends with it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
    task::JoinSet,
};

/// The proxy's switch, shared with its forwarding tasks.
#[derive(Debug, Default)]
struct Switch {
    blackholed: AtomicBool,
    resumed: Notify,
}

impl Switch {
    async fn pass(&self) {
        loop {
            let resumed = self.resumed.notified();
            if !self.blackholed.load(Ordering::SeqCst) {
                return;
            }
            resumed.await;
        }
    }
}

/// A running proxy; dropping it stops every task it started.
#[derive(Debug)]
pub struct BlackholeProxy {
    addr: SocketAddr,
    switch: Arc<Switch>,
    _stop: watch::Sender<()>,
}

impl BlackholeProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let switch = Arc::new(Switch::default());
        let (stop, mut stopped) = watch::channel(());
        let accept_switch = switch.clone();
        tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        connections.spawn(forward(client, upstream, accept_switch.clone()));
                    }
                }
            }
            connections.abort_all();
        });
        Ok(Self {
            addr,
            switch,
            _stop: stop,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding (on) or resumes it (off). Nothing is closed either way.
    pub fn blackhole(&self, on: bool) {
        self.switch.blackholed.store(on, Ordering::SeqCst);
        if !on {
            self.switch.resumed.notify_waiters();
        }
    }
}

async fn forward(client: TcpStream, upstream: SocketAddr, switch: Arc<Switch>) {
    switch.pass().await;
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pipe(client_read, server_write, &switch),
        pipe(server_read, client_write, &switch),
    );
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    switch: &Switch,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        switch.pass().await;
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Bytes read just before the switch flipped are held until it flips back.
        switch.pass().await;
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
