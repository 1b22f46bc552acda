"""The Pico serial tap: reads up to two UART lines and forwards every byte, timestamped, to the box.

One loop, no threads (MicroPython's are optional and the Pico's second core is not worth the
locking): read each UART without blocking, stamp the bytes, frame them (tapframe, channels 0/1),
drain the sync-edge ring the pin interrupt fills (channel 2), send a heartbeat every second
(channel 3), push queued frames into the CDC link as far as it takes them, feed the watchdog.
The first frame after boot is a hello (channel 4, flag FIRST), preceded by a lone 0x00 so the
box discards whatever partial frame it held from before the reset.

Time: every stamp is ``ticks_us`` extended to 64 bits (tapframe.TickExtender), so the box never
sees the 2^30 µs wrap. A run of n bytes read at ``now`` is stamped with the latest instant its
first byte can have arrived: ``now - (n-1) * character time`` (the last byte arrived by ``now``
and the bytes came one character apart at best), but not before the previous poll of that line.

Nothing is lost silently: a frame that does not fit in the transmit queue (the host is not
reading) is dropped whole and counted, and since ``seq`` counts every frame built, the box sees
exactly how many it missed.
"""

import array
import struct
import sys

import tapframe
from dualrec_tap import port

NAME_VERSION = "dualrec-tap/0.1.0"
HEARTBEAT_US = 1_000_000


class EdgeRing:
    """Sync-line edges from the pin interrupt to the main loop: preallocated, allocation-free.

    irq() runs as a hard interrupt on the Pico: it may not allocate, so it only stores the raw
    ticks and the edge's index in arrays and moves small-int indexes. One writer (irq), one
    reader (drain in the loop); an edge that finds the ring full is counted in ``lost``.
    """

    def __init__(self, size=32):
        self.size = size
        self.ticks = array.array("i", [0] * size)
        self.index = array.array("i", [0] * size)
        self.head = 0
        self.tail = 0
        self.edges = 0
        self.lost = 0

    def irq(self, pin):
        t = port.ticks_us()  # first: the stamp is what this is for
        h = self.head
        nxt = h + 1
        if nxt == self.size:
            nxt = 0
        if nxt == self.tail:
            self.lost += 1
        else:
            self.ticks[h] = t
            self.index[h] = self.edges
            self.head = nxt
        self.edges += 1


class Tap:
    def __init__(self, hw):
        self.hw = hw
        cfg = hw.cfg
        self.ext = tapframe.TickExtender(port.TICKS_PERIOD)
        self.seq = 0
        self.chunk = min(cfg["chunk"], tapframe.MAX_PAYLOAD)
        self.buf = bytearray(self.chunk)
        self.mv = memoryview(self.buf)
        # 16ths of a µs per 10-bit character: integer maths that stays a small int on the Pico
        # for any chunk and baud rate (a big int would allocate on every read).
        self.char16 = 160_000_000 // hw.baud
        self.nbytes = [0, 0]
        self.overruns = 0
        self.uart_errors = 0
        self.boots = 0
        self.dropped = 0
        self.loop_max = 0
        self.txq = []
        self.tx_off = 0
        self.tx_bytes = 0
        self.tx_limit = cfg["txq"]
        self.ring = EdgeRing()
        now = port.ticks_us()
        self.last_poll = [now for _ in hw.uarts]
        self.hb_due = now

    # --- frames out --------------------------------------------------------------------------

    def send(self, channel, ticks, flags, payload):
        frame = tapframe.encode(channel, self.seq, ticks, flags, payload)
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        if self.tx_bytes + len(frame) > self.tx_limit:
            self.dropped += 1  # whole frames only: a partial one would corrupt the stream
            return
        self.txq.append(frame)
        self.tx_bytes += len(frame)

    def flush(self):
        link = self.hw.link
        while self.txq:
            head = self.txq[0]
            n = link.write(memoryview(head)[self.tx_off :])
            if not n:
                return
            self.tx_off += n
            if self.tx_off < len(head):
                return  # the link is full; the rest goes next time, before anything else
            self.txq.pop(0)
            self.tx_bytes -= len(head)
            self.tx_off = 0

    def hello(self, cause):
        self.txq.append(b"\x00")  # ends any partial frame the host holds from before the reset
        self.tx_bytes += 1
        fields = {
            "boots": self.boots,
            "cause": cause,
            "period": port.TICKS_PERIOD,
            "baud": self.hw.baud,
            "lines": len(self.hw.uarts),
            "platform": sys.platform,
        }
        self.send(tapframe.CH_HELLO, self.ext.extend(port.ticks_us()), tapframe.FLAG_FIRST,
                  tapframe.pack_hello(NAME_VERSION, fields))

    def heartbeat(self, now):
        ring = self.ring
        values = (self.nbytes[0], self.nbytes[1], self.overruns, self.uart_errors, self.boots,
                  self.seq + 1, self.dropped, ring.edges, ring.lost, self.loop_max)
        self.loop_max = 0
        self.send(tapframe.CH_HEARTBEAT, self.ext.extend(now), 0, tapframe.pack_u32s(values))

    # --- inputs ------------------------------------------------------------------------------

    def poll_uarts(self):
        for i, uart in enumerate(self.hw.uarts):
            n = uart.read(self.buf)
            now = port.ticks_us()
            if n:
                flags = uart.errors()
                if flags & tapframe.FLAG_OVERRUN:
                    self.overruns += 1
                if flags & (tapframe.FLAG_FRAMING | tapframe.FLAG_PARITY | tapframe.FLAG_BREAK):
                    self.uart_errors += 1
                back = ((n - 1) * self.char16) >> 4
                since = port.ticks_diff(now, self.last_poll[i])
                if back > since:
                    back = since
                self.nbytes[i] += n
                self.send(i, self.ext.extend(now) - back, flags, self.mv[:n])
            self.last_poll[i] = now

    def drain_edges(self):
        ring = self.ring
        while ring.tail != ring.head:
            t = ring.tail
            raw, index = ring.ticks[t], ring.index[t]
            t += 1
            ring.tail = 0 if t == ring.size else t
            self.send(tapframe.CH_SYNC, self.ext.extend(raw), 0, struct.pack("<I", index))

    # --- the loop ----------------------------------------------------------------------------

    def start(self):
        hw = self.hw
        self.boots = hw.count_boot()
        if hw.sync is not None:
            hw.sync.start(self.ring.irq)
        self.hello(hw.reset_cause())
        self.hb_due = port.ticks_us()

    def step(self):
        hw = self.hw
        t0 = port.ticks_us()
        self.poll_uarts()
        if hw.sync is not None:
            hw.sync.service()
        self.drain_edges()
        now = port.ticks_us()
        if port.ticks_diff(now, self.hb_due) >= 0:
            # Also what keeps the TickExtender fed at least once a second.
            self.heartbeat(now)
            self.hb_due = (now + HEARTBEAT_US) & (port.TICKS_PERIOD - 1)
        self.flush()
        hw.wdt.feed()
        took = port.ticks_diff(port.ticks_us(), t0)
        if took > self.loop_max:
            self.loop_max = took

    def run(self):
        self.start()
        hw = self.hw
        while True:
            self.step()
            hw.idle()


def main():
    try:
        import micropython

        micropython.alloc_emergency_exception_buf(100)  # a traceback from the hard IRQ
    except (ImportError, AttributeError):
        pass
    hw = port.Hardware(port.load_config())
    tap = Tap(hw)
    try:
        tap.run()
    except KeyboardInterrupt:
        # A technician at the REPL: stop the watchdog so the Pico does not reset under them.
        # Any other exception ends main.py with the watchdog running: the Pico resets and the
        # tap comes back, which the box sees as a tap reset.
        hw.wdt.disable()
        raise
