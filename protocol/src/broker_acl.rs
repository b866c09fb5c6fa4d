//! What a device may do on the broker, checked on the bytes it sends, packet by packet
//! (MQTT 3.1.1, the protocol the agent speaks).
//!
//! A device logs in as itself (user name = client id = its [`DeviceId`]) and then may
//! only:
//! - publish to its own `status`, `telemetry` and `events` topics, and set the retain
//!   flag only on its own `status` (its presence);
//! - subscribe to its own `cmd` topic;
//! - name a last will on its own `status` topic;
//! - acknowledge, ping, unsubscribe and disconnect.
//!
//! Anything else — a login without a user name, another protocol level, a second
//! CONNECT, a packet before CONNECT, a packet a server sends, a packet larger than
//! [`MAX_PACKET`], a malformed one — is [`Denied`]; the relay in front of the broker then
//! closes the connection (MQTT 3.1.1 has no way to refuse one publish).
//!
//! Sans-io: [`frame_len`] finds where the first whole packet in a buffer ends, and
//! [`Acl::check`] judges one packet. Nothing here allocates in proportion to its input.

use crate::telemetry::{Channel, DeviceId, MAX_MESSAGE, parse_topic, topic};

/// The largest packet a device may send: a whole message plus its topic and headers.
pub const MAX_PACKET: usize = MAX_MESSAGE + 1024;

/// The largest CONNECT: its will is a status (a few hundred bytes). A login is judged
/// before anything else is read, so a stranger cannot make the relay hold a whole
/// message's worth of memory per connection.
pub const MAX_CONNECT: usize = 8 << 10;

/// The longest keep-alive a device may ask for, seconds (the agent's is 30): a device
/// must send something this often, and each packet is when the relay sees that it was
/// revoked.
pub const MAX_KEEP_ALIVE_S: u16 = 120;

/// Why a device's packet is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("malformed MQTT packet: {0}")]
    Malformed(&'static str),
    #[error("a packet of {len} bytes is larger than the {max} a device may send")]
    TooLarge { len: usize, max: usize },
    #[error("MQTT protocol level {0}; devices speak MQTT 3.1.1 (level 4)")]
    Protocol(u8),
    #[error("packet type {0} before CONNECT")]
    NotConnected(u8),
    #[error("a second CONNECT on one connection")]
    ConnectAgain,
    #[error("a login without a device's user name (anonymous logins are refused)")]
    Anonymous,
    #[error("user name `{user}` is not the client id `{client}`")]
    NotItself { user: String, client: String },
    #[error("publish to `{0}`: a device publishes only to its own status, telemetry and events")]
    Publish(String),
    #[error("retained publish to `{0}`: only a device's own status is retained")]
    Retain(String),
    #[error("subscription to `{0}`: a device subscribes only to its own cmd topic")]
    Subscribe(String),
    #[error("last will on `{0}`: a device's will is its own status")]
    Will(String),
    #[error("packet type {0} is not one a client sends")]
    ServerPacket(u8),
    #[error("keep-alive {0} s; a device keeps alive every 1 to {MAX_KEEP_ALIVE_S} s")]
    KeepAlive(u16),
}

/// The length of the first whole packet at the start of `buf`: `Ok(None)` while more
/// bytes are needed, an error once the length is malformed or larger than `max`.
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, Denied> {
    let mut remaining: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let len = 1 + i + 1 + remaining;
            if len > max {
                return Err(Denied::TooLarge { len, max });
            }
            return Ok((buf.len() >= len).then_some(len));
        }
    }
    Err(Denied::Malformed("remaining length longer than 4 bytes"))
}

/// One connection's judge: which device logged in on it.
#[derive(Debug, Default)]
pub struct Acl {
    device: Option<DeviceId>,
}

impl Acl {
    pub fn new() -> Acl {
        Acl::default()
    }

    /// The device logged in on this connection, once CONNECT was allowed.
    pub fn device(&self) -> Option<&DeviceId> {
        self.device.as_ref()
    }

    /// The largest packet [`frame_len`] should accept next: a CONNECT's until the login,
    /// [`MAX_PACKET`] after.
    pub fn max_packet(&self) -> usize {
        if self.device.is_some() {
            MAX_PACKET
        } else {
            MAX_CONNECT
        }
    }

    /// Judges one whole packet (as [`frame_len`] delimited it).
    pub fn check(&mut self, packet: &[u8]) -> Result<(), Denied> {
        let first = *packet.first().ok_or(Denied::Malformed("empty"))?;
        let header = frame_len(packet, usize::MAX)?
            .filter(|n| *n == packet.len())
            .ok_or(Denied::Malformed("length does not match"))?;
        let body_start = header - remaining_len(packet);
        let body = Reader {
            bytes: &packet[body_start..],
        };
        let kind = first >> 4;
        let flags = first & 0x0f;
        match (kind, &self.device) {
            (1, None) => {
                let device = connect(body, flags)?;
                self.device = Some(device);
                Ok(())
            }
            (1, Some(_)) => Err(Denied::ConnectAgain),
            (_, None) => Err(Denied::NotConnected(kind)),
            (3, Some(me)) => publish(body, flags, me),
            (8, Some(me)) => subscribe(body, flags, me),
            // PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBSCRIBE, PINGREQ, DISCONNECT.
            (4..=7 | 10 | 12 | 14, Some(_)) => Ok(()),
            (k, Some(_)) => Err(Denied::ServerPacket(k)),
        }
    }
}

/// The remaining length of a packet already delimited.
fn remaining_len(packet: &[u8]) -> usize {
    let mut remaining = 0usize;
    for (i, b) in packet.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    remaining
}

/// Reads MQTT fields from a packet body.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, Denied> {
        let (&b, rest) = self
            .bytes
            .split_first()
            .ok_or(Denied::Malformed("truncated"))?;
        self.bytes = rest;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, Denied> {
        Ok(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }

    fn binary(&mut self) -> Result<&'a [u8], Denied> {
        let n = usize::from(self.u16()?);
        if self.bytes.len() < n {
            return Err(Denied::Malformed("a field runs past the packet"));
        }
        let (field, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(field)
    }

    fn string(&mut self) -> Result<&'a str, Denied> {
        std::str::from_utf8(self.binary()?).map_err(|_| Denied::Malformed("a string is not UTF-8"))
    }
}

fn connect(mut body: Reader<'_>, flags: u8) -> Result<DeviceId, Denied> {
    if flags != 0 {
        return Err(Denied::Malformed("CONNECT flags"));
    }
    let name = body.string()?;
    let level = body.u8()?;
    if name != "MQTT" || level != 4 {
        return Err(Denied::Protocol(level));
    }
    let connect_flags = body.u8()?;
    let keep_alive = body.u16()?;
    if keep_alive == 0 || keep_alive > MAX_KEEP_ALIVE_S {
        return Err(Denied::KeepAlive(keep_alive));
    }
    let client = body.string()?;
    let will = if connect_flags & 0x04 != 0 {
        let will_topic = body.string()?;
        let _message = body.binary()?;
        Some(will_topic)
    } else {
        None
    };
    if connect_flags & 0x80 == 0 {
        return Err(Denied::Anonymous);
    }
    let user = body.string()?;
    if user != client {
        return Err(Denied::NotItself {
            user: cut(user),
            client: cut(client),
        });
    }
    let device = DeviceId::new(user).map_err(|_| Denied::Anonymous)?;
    if let Some(will_topic) = will
        && will_topic != topic(&device, Channel::Status)
    {
        return Err(Denied::Will(cut(will_topic)));
    }
    Ok(device)
}

fn publish(mut body: Reader<'_>, flags: u8, me: &DeviceId) -> Result<(), Denied> {
    if flags & 0x06 == 0x06 {
        return Err(Denied::Malformed("QoS 3"));
    }
    let name = body.string()?;
    let channel = match parse_topic(name) {
        Ok((device, channel)) if &device == me && channel != Channel::Cmd => channel,
        _ => return Err(Denied::Publish(cut(name))),
    };
    if flags & 0x01 != 0 && channel != Channel::Status {
        return Err(Denied::Retain(cut(name)));
    }
    Ok(())
}

fn subscribe(mut body: Reader<'_>, flags: u8, me: &DeviceId) -> Result<(), Denied> {
    if flags != 0x02 {
        return Err(Denied::Malformed("SUBSCRIBE flags"));
    }
    let _packet_id = body.u16()?;
    let own = topic(me, Channel::Cmd);
    let mut filters = 0;
    while !body.bytes.is_empty() {
        let filter = body.string()?;
        let _qos = body.u8()?;
        if filter != own {
            return Err(Denied::Subscribe(cut(filter)));
        }
        filters += 1;
    }
    if filters == 0 {
        return Err(Denied::Malformed("SUBSCRIBE without a filter"));
    }
    Ok(())
}

/// At most 200 characters of what a device sent, for an error.
fn cut(text: &str) -> String {
    text.chars().take(200).collect()
}
