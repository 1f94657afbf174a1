// Single-node OpenSearch launcher for local development and integration tests.
//
// The OpenSearch distribution (bin/opensearch, modules/, plugins/) is not
// published to Maven Central, but the server jar and the module jars are.
// This class starts an org.opensearch.node.Node directly with the modules we
// need loaded from the classpath, the same way the OpenSearch test framework's
// MockNode does. Bootstrap checks and the Java security manager are not
// installed: this is a loopback-only development server.
//
// Usage: java -cp 'libs/*:classes' FlowshipOpenSearch <config-dir>
//   <config-dir> must contain opensearch.yml and log4j2.properties.

import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Collection;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.opensearch.common.logging.LogConfigurator;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.plugins.Plugin;

public final class FlowshipOpenSearch {

    /** Modules loaded from the classpath; the optional ones are skipped when absent. */
    private static final String[] REQUIRED_PLUGINS = {
        "org.opensearch.transport.Netty4Plugin",
    };
    private static final String[] OPTIONAL_PLUGINS = {
        "org.opensearch.analysis.common.CommonAnalysisPlugin",
        "org.opensearch.painless.PainlessPlugin",
    };

    static final class DevNode extends Node {
        DevNode(Environment env, Collection<Class<? extends Plugin>> plugins) {
            super(env, plugins, true);
        }
    }

    private FlowshipOpenSearch() {}

    @SuppressWarnings("unchecked")
    private static Class<? extends Plugin> pluginClass(String name, boolean required) throws ClassNotFoundException {
        try {
            return (Class<? extends Plugin>) Class.forName(name);
        } catch (ClassNotFoundException e) {
            if (required) {
                throw e;
            }
            System.err.println("flowship-opensearch: optional module " + name + " not on the classpath, skipped");
            return null;
        }
    }

    public static void main(String[] args) {
        try {
            run(args);
        } catch (Throwable t) {
            t.printStackTrace();
            // Last line of the log, so `deploy/dev/servers start` shows it.
            System.err.println("flowship-opensearch: failed to start: " + t);
            System.err.flush();
            Runtime.getRuntime().halt(1);
        }
    }

    private static void run(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: FlowshipOpenSearch <config-dir>");
            System.exit(2);
        }
        Path configDir = Paths.get(args[0]).toAbsolutePath();
        Path yml = configDir.resolve("opensearch.yml");
        if (!Files.isRegularFile(yml)) {
            System.err.println("flowship-opensearch: missing " + yml);
            System.exit(2);
        }
        Settings fileSettings = Settings.builder().loadFromPath(yml).build();
        String nodeName = fileSettings.get("node.name", "flowship-dev");
        if (fileSettings.get("path.home") == null) {
            System.err.println("flowship-opensearch: path.home must be set in " + yml);
            System.exit(2);
        }
        // opensearch.yml in configDir is read again by prepareEnvironment; path.home
        // has to be given up front because the environment is built from it.
        Settings input = Settings.builder().put("path.home", fileSettings.get("path.home")).build();
        Environment env = InternalSettingsPreparer.prepareEnvironment(
            input, Collections.emptyMap(), configDir, () -> nodeName);

        LogConfigurator.setNodeName(nodeName);
        LogConfigurator.configure(env);

        List<Class<? extends Plugin>> plugins = new ArrayList<>();
        for (String name : REQUIRED_PLUGINS) {
            plugins.add(pluginClass(name, true));
        }
        for (String name : OPTIONAL_PLUGINS) {
            Class<? extends Plugin> c = pluginClass(name, false);
            if (c != null) {
                plugins.add(c);
            }
        }

        final Node node = new DevNode(env, plugins);
        final CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
                node.awaitClose(20, TimeUnit.SECONDS);
            } catch (Exception e) {
                e.printStackTrace();
            } finally {
                stopped.countDown();
            }
        }, "flowship-opensearch-shutdown"));

        node.start();
        System.out.println("flowship-opensearch: node started");
        // Node threads may all be daemon threads; keep the JVM alive until shutdown.
        Thread keepAlive = new Thread(() -> {
            try {
                stopped.await();
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }, "flowship-opensearch-keepalive");
        keepAlive.setDaemon(false);
        keepAlive.start();
    }
}
