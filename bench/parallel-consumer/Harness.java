// Confluent's Parallel Consumer on one partition with KEY ordering and a sink that takes L per
// record, at max concurrency C: the peer `feature-host bench stream` measures itself against,
// on the same broker, topic and events.
//
//   bench/parallel-consumer/run --bootstrap B --topic T --events N --concurrency C \
//       --latency-us L --group G
//
// Prints `name=value` lines: eps (records/s from the first record processed to the N-th
// finished) and measured_latency_ms (what the sink's wait really took, on average: parkNanos
// to a deadline, since Thread.sleep rounds to whole milliseconds).

import io.confluent.parallelconsumer.ParallelConsumerOptions;
import io.confluent.parallelconsumer.ParallelStreamProcessor;
import java.time.Duration;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.LongAdder;
import java.util.concurrent.locks.LockSupport;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.serialization.StringDeserializer;

public class Harness {
    public static void main(String[] argv) throws Exception {
        Map<String, String> args = new HashMap<>();
        for (int i = 0; i + 1 < argv.length; i += 2) {
            args.put(argv[i].replaceFirst("^--", ""), argv[i + 1]);
        }
        String bootstrap = need(args, "bootstrap");
        String topic = need(args, "topic");
        long events = Long.parseLong(need(args, "events"));
        int concurrency = Integer.parseInt(need(args, "concurrency"));
        long latencyNs = Long.parseLong(need(args, "latency-us")) * 1_000L;
        String group = need(args, "group");

        Properties props = new Properties();
        props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(ConsumerConfig.GROUP_ID_CONFIG, group);
        props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        KafkaConsumer<String, String> consumer = new KafkaConsumer<>(props);

        ParallelConsumerOptions<String, String> options = ParallelConsumerOptions.<String, String>builder()
                .ordering(ParallelConsumerOptions.ProcessingOrder.KEY)
                .maxConcurrency(concurrency)
                .consumer(consumer)
                .commitMode(ParallelConsumerOptions.CommitMode.PERIODIC_CONSUMER_ASYNCHRONOUS)
                .build();
        ParallelStreamProcessor<String, String> processor =
                ParallelStreamProcessor.createEosStreamProcessor(options);
        processor.subscribe(List.of(topic));

        AtomicLong first = new AtomicLong(0);
        LongAdder done = new LongAdder();
        LongAdder waitedNs = new LongAdder();
        CountDownLatch finished = new CountDownLatch(1);
        processor.poll(ctx -> {
            for (var record : ctx.getConsumerRecordsFlattened()) {
                long start = System.nanoTime();
                first.compareAndSet(0, start);
                long deadline = start + latencyNs;
                for (long left = latencyNs; left > 0; left = deadline - System.nanoTime()) {
                    LockSupport.parkNanos(left);
                }
                waitedNs.add(System.nanoTime() - start);
                done.increment();
                if (done.sum() >= events) {
                    finished.countDown();
                }
            }
        });
        if (!finished.await(600, TimeUnit.SECONDS)) {
            System.err.println("parallel consumer finished " + done.sum() + " of " + events);
            System.exit(1);
        }
        long elapsed = System.nanoTime() - first.get();
        System.out.println("eps=" + (events * 1e9 / elapsed));
        System.out.println("measured_latency_ms=" + (waitedNs.sum() / 1e6 / done.sum()));
        System.out.flush();
        processor.closeDontDrainFirst(Duration.ofSeconds(10));
        System.exit(0);
    }

    private static String need(Map<String, String> args, String name) {
        String v = args.get(name);
        if (v == null) {
            System.err.println("missing --" + name);
            System.exit(2);
        }
        return v;
    }
}
