//! A fault-injecting network between real replica processes, for the chaos suite: one TCP
//! proxy in front of each replica, and per-link rules that cut traffic or drop one
//! direction of it.
//!
//! Replica `i` (0-based) sends its peer traffic from its own loopback address, `127.0.0.(10 +
//! i)` (`keel server --peer-source-ip`), and peers reach it through its proxy. A proxy sees
//! which replica a connection comes from by its source address, so a rule can name a
//! directed link `from -> to`. Everything stays on 127.0.0.0/8.
//!
//! - `cut(from, to)`: new connections are refused and open ones are closed, so `from`'s
//!   requests never reach `to` (and neither do the answers to them).
//! - `drop_replies(from, to)`: `from`'s requests reach `to`, `to`'s answers are held back
//!   until the rule goes: the "can send but not receive" half of an asymmetric partition.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The loopback address replica `i` sends its peer traffic from.
pub fn source_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + i as u8))
}

fn replica_of(ip: IpAddr) -> Option<usize> {
    match ip {
        IpAddr::V4(v4) if v4.octets()[..3] == [127, 0, 0] && v4.octets()[3] >= 10 => Some(v4.octets()[3] as usize - 10),
        _ => None,
    }
}

#[derive(Default, Debug, Clone, PartialEq, Eq)]
struct Rules {
    cut: HashSet<(usize, usize)>,
    one_way: HashSet<(usize, usize)>,
}

/// The proxies of one cluster and the rules they apply.
pub struct FaultNet {
    rules: watch::Sender<Rules>,
    /// Proxy address of each replica: what the replica advertises to its peers.
    pub proxies: Vec<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FaultNet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl FaultNet {
    /// A proxy for each target (the replicas' real listen addresses).
    pub async fn start(targets: &[SocketAddr]) -> std::io::Result<FaultNet> {
        let (rules, _) = watch::channel(Rules::default());
        let mut proxies = Vec::new();
        let mut tasks = Vec::new();
        for (to, target) in targets.iter().enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            proxies.push(listener.local_addr()?);
            let rx = rules.subscribe();
            let target = *target;
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((conn, peer)) = listener.accept().await else { continue };
                    let from = replica_of(peer.ip());
                    let rx = rx.clone();
                    tokio::spawn(relay(conn, from, to, target, rx));
                }
            }));
        }
        Ok(FaultNet { rules, proxies, tasks })
    }

    /// Cuts the link `from -> to` (and, with `both`, `to -> from`).
    pub fn cut(&self, from: usize, to: usize, both: bool) {
        self.rules.send_modify(|r| {
            r.cut.insert((from, to));
            if both {
                r.cut.insert((to, from));
            }
        });
    }

    /// Cuts every link between `a` and the rest (both directions).
    pub fn isolate(&self, a: usize, n: usize) {
        for b in (0..n).filter(|b| *b != a) {
            self.cut(a, b, true);
        }
    }

    /// `from`'s requests reach `to`; `to`'s answers are held back until `heal`.
    pub fn drop_replies(&self, from: usize, to: usize) {
        self.rules.send_modify(|r| {
            r.one_way.insert((from, to));
        });
    }

    /// Removes every rule.
    pub fn heal(&self) {
        self.rules.send_replace(Rules::default());
    }
}

fn blocked(r: &Rules, from: Option<usize>, to: usize) -> bool {
    from.is_some_and(|f| r.cut.contains(&(f, to)))
}

/// Copies bytes both ways until either side closes or a rule cuts the link.
async fn relay(
    mut client: TcpStream,
    from: Option<usize>,
    to: usize,
    target: SocketAddr,
    mut rules: watch::Receiver<Rules>,
) {
    if blocked(&rules.borrow(), from, to) {
        return;
    }
    let Ok(Ok(mut server)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut up = [0u8; 16 * 1024];
    let mut down = [0u8; 16 * 1024];
    loop {
        let one_way = from.is_some_and(|f| rules.borrow().one_way.contains(&(f, to)));
        tokio::select! {
            changed = rules.changed() => {
                if changed.is_err() || blocked(&rules.borrow(), from, to) {
                    return;
                }
            }
            // Every chunk checks the rules as it goes: once `cut` returns, not one more byte
            // crosses the link, whatever was in flight.
            n = cr.read(&mut up) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if blocked(&rules.borrow(), from, to) || sw.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                }
            },
            // A one-way link holds the answers back, as a network that loses them would:
            // TCP delivers them late or never, it never delivers a stream with a hole in it.
            n = sr.read(&mut down), if !one_way => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if blocked(&rules.borrow(), from, to) || cw.write_all(&down[..n]).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What the echo server received.
    type Seen = Arc<Mutex<Vec<u8>>>;

    /// An echo server that also records what it received.
    async fn echo() -> (SocketAddr, Seen) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let s = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut c, _)) = l.accept().await else { return };
                let s = s.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = c.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        s.lock().unwrap().extend_from_slice(&buf[..n]);
                        if c.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    /// Connects to `proxy` from replica `from`'s source address.
    async fn dial(proxy: SocketAddr, from: usize) -> std::io::Result<TcpStream> {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind(SocketAddr::new(source_ip(from), 0))?;
        s.connect(proxy).await
    }

    async fn round_trip(c: &mut TcpStream, msg: &[u8]) -> Option<Vec<u8>> {
        c.write_all(msg).await.ok()?;
        let mut buf = vec![0u8; msg.len()];
        match tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf),
            _ => None,
        }
    }

    #[tokio::test]
    async fn links_pass_then_cut_then_drop_replies_then_heal() {
        let (target, seen) = echo().await;
        let net = FaultNet::start(&[target]).await.unwrap();
        let proxy = net.proxies[0];
        let mut c = dial(proxy, 1).await.unwrap();
        assert_eq!(round_trip(&mut c, b"hello").await.as_deref(), Some(&b"hello"[..]));

        // Cut 1 -> 0: the open connection ends, new ones get nowhere; 2 -> 0 still works.
        net.cut(1, 0, false);
        assert_eq!(round_trip(&mut c, b"lost").await, None);
        let mut again = dial(proxy, 1).await.unwrap();
        assert_eq!(round_trip(&mut again, b"lost2").await, None);
        let mut other = dial(proxy, 2).await.unwrap();
        assert_eq!(round_trip(&mut other, b"fine").await.as_deref(), Some(&b"fine"[..]));

        // One way: 3's requests arrive, its answers do not.
        net.drop_replies(3, 0);
        let mut half = dial(proxy, 3).await.unwrap();
        assert_eq!(round_trip(&mut half, b"one-way").await, None);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(seen.lock().unwrap().windows(7).any(|w| w == b"one-way"), "the request reached the server");
        assert!(!seen.lock().unwrap().windows(4).any(|w| w == b"lost"), "cut traffic never arrived");

        net.heal();
        let mut healed = dial(proxy, 1).await.unwrap();
        assert_eq!(round_trip(&mut healed, b"back").await.as_deref(), Some(&b"back"[..]));
        let mut healed3 = dial(proxy, 3).await.unwrap();
        assert_eq!(round_trip(&mut healed3, b"both").await.as_deref(), Some(&b"both"[..]));
    }
}
